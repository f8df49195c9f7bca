"""Several vsproxy nodes as one service, sharing state through Redis (`cluster.redis_url`).

- `node.Cluster`: this node's link to Redis: its heartbeat in the node registry, the pub/sub
  control channel, upstream leases, and what /health reports (Redis reachable or not).
- `sessions.ClusterSessionManager`: sessions in Redis, limits enforced there atomically (Lua);
  every node keeps a mirror of them for reads and closes its viewers on a destroy message.
- `relay.ClusterSource`: wraps each upstream's source: the node holding the upstream's lease (the
  origin) runs the real source; every other node with viewers (an edge) pulls the frames from the
  origin over one authenticated WebSocket (`relay.RelayHandler`, /internal/relay/{upstream}).
- `ingest`: a frame POSTed to a node that does not have the push upstream's publisher is
  forwarded to the node that has (`ingest.ForwardedFrameHandler`, /internal/ingest/{upstream}/frame).
- `whep.WhepDirectory`: which node holds each WHEP peer, so its DELETE works on any node.

Redis is imported only here, so a single node never loads it.
"""

from .node import Cluster, ClusterUnavailable
from .relay import ClusterSource, RelayHandler
from .sessions import ClusterSessionManager, NoRateLimit
from .whep import WhepDirectory

__all__ = ["Cluster", "ClusterSessionManager", "ClusterSource", "ClusterUnavailable", "NoRateLimit", "RelayHandler",
           "WhepDirectory"]
