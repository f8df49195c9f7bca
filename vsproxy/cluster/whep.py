"""WHEP resources across the cluster: a WebRTC peer lives on the node that answered its offer, but
behind a load balancer without stickiness its `DELETE /stream/{id}/whep/{resource}` (or the `POST`
renewing its viewer token) lands on any node. Redis keeps which node holds each resource, and a
control message asks that node to end it (or to keep it until the renewed token's expiry).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .node import PREFIX, REDIS_ERRORS, Cluster, node_key

if TYPE_CHECKING:
    from ..outputs.webrtc import WhepPeer, WhepPeers

log = logging.getLogger("vsproxy.cluster")

# A resource is remembered this long at most (a node that died cannot delete its keys: a DELETE
# finds that node gone, answers 404 and forgets the resource); a DELETE on another node of a peer
# older than this is a 404, and the peer ends when its client leaves.
RESOURCE_TTL_SECONDS = 24 * 3600
# An ended peer is remembered this long for the DELETE its client may still send (to any node).
ENDED_TTL_SECONDS = 300
DELETE_OP = "whep-delete"
RENEW_OP = "whep-renew"


def resource_key(resource_id: str) -> str:
    return f"{PREFIX}whep:{resource_id}"


class WhepDirectory:
    """Which node holds each of the cluster's WHEP peers (set as `WhepPeers.directory`)."""

    def __init__(self, cluster: Cluster, peers: WhepPeers) -> None:
        self.cluster = cluster
        self.peers = peers
        self._tasks: set[asyncio.Task] = set()
        # The peers whose record is being written (`added`): what follows for one waits for it, or
        # the two commands, on different connections of the pool, could land in either order.
        self._adding: dict[str, asyncio.Future] = {}
        cluster.event_handlers[DELETE_OP] = self._on_delete
        cluster.event_handlers[RENEW_OP] = self._on_renew

    async def added(self, peer: WhepPeer) -> None:
        """A peer was made here: before its answer goes out, so a DELETE anywhere finds it. Redis
        unreachable: the peer still works, and only a DELETE on this node ends it early."""
        record = json.dumps({"node": self.cluster.node_id, "instance": self.cluster.instance,
                             "session": peer.session_id})
        written = self._adding[peer.id] = asyncio.get_running_loop().create_future()
        try:
            await self.cluster.redis.set(resource_key(peer.id), record, ex=RESOURCE_TTL_SECONDS)
        except REDIS_ERRORS as exc:
            self.cluster.failed(exc)
        finally:
            del self._adding[peer.id]
            written.set_result(None)

    def removed(self, peer: WhepPeer) -> None:
        """A peer of this node ended (however), in the background: forgotten if its client
        deleted it; otherwise remembered as ended for ENDED_TTL_SECONDS, so that the DELETE its
        client may still send is a 200 on any node (a page that unloads sends it as its
        connection closes), once."""
        if peer.deleted:
            self.forget(peer.id)
            return
        record = json.dumps({"ended": True, "session": peer.session_id})
        self._background(peer.id, lambda: self.cluster.redis.set(resource_key(peer.id), record,
                                                                 ex=ENDED_TTL_SECONDS))

    def forget(self, resource_id: str) -> None:
        """Forget a resource, in the background."""
        self._background(resource_id, lambda: self.cluster.redis.delete(resource_key(resource_id)))

    def _background(self, resource_id: str, command: Callable[[], Awaitable]) -> None:
        # After the resource's record is written, if that is under way (a peer that ended at once).
        task = asyncio.ensure_future(self._run(self._adding.get(resource_id), command))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, after: asyncio.Future | None, command: Callable[[], Awaitable]) -> None:
        if after is not None:
            await asyncio.shield(after)  # cancelled here (at exit), `added` must still complete it
        try:
            await command()
        except REDIS_ERRORS as exc:
            self.cluster.failed(exc)

    async def end(self, session_id: str, resource_id: str) -> bool:
        """End a peer of `session_id` held by another node, or answer the first DELETE of one that
        ended there: False if there is none (503 if Redis cannot be reached to find out)."""
        key = resource_key(resource_id)
        record = await self._record(session_id, resource_id)
        if record is None:
            return False
        if record.get("ended"):  # its first DELETE wins the key; a second finds nothing: 404
            return bool(await self.cluster.write(lambda: self.cluster.redis.delete(key)))
        if not await self._holder_alive(resource_id, record):
            return False
        await self.cluster.write(lambda: self.cluster.publish(
            {"op": DELETE_OP, "node": record["node"], "resource": resource_id, "session": session_id}))
        return True

    async def renew(self, session_id: str, resource_id: str, expires: float) -> bool:
        """Have the node holding a peer of `session_id` end it at `expires` (a renewed viewer
        token's expiry) instead: False if there is none, or it ended (503 if Redis cannot be
        reached to find out)."""
        record = await self._record(session_id, resource_id)
        if record is None or record.get("ended") or not await self._holder_alive(resource_id, record):
            return False
        await self.cluster.write(lambda: self.cluster.publish(
            {"op": RENEW_OP, "node": record["node"], "resource": resource_id, "session": session_id,
             "expires": expires}))
        return True

    async def _record(self, session_id: str, resource_id: str) -> dict | None:
        """The resource's record in Redis, if it is one of `session_id`."""
        raw = await self.cluster.write(lambda: self.cluster.redis.get(resource_key(resource_id)))
        if raw is None:
            return None
        record = json.loads(raw)
        return record if record.get("session") == session_id else None

    async def _holder_alive(self, resource_id: str, record: dict) -> bool:
        """Is the node process that made the peer still running? If it is gone (killed, or
        restarted since: another instance), the peer went with it and its record is forgotten."""
        holder = await self.cluster.write(lambda: self.cluster.redis.get(node_key(record["node"])))
        if holder is None or json.loads(holder).get("instance") != record.get("instance"):
            self.forget(resource_id)
            return False
        return True

    def _on_delete(self, event: dict) -> None:
        if event["node"] != self.cluster.node_id:
            return
        peer = self.peers.get(event["resource"])
        if peer is not None and peer.session_id == event["session"]:
            self.peers.delete(peer, "ended by the client (DELETE on another node)")

    def _on_renew(self, event: dict) -> None:
        if event["node"] != self.cluster.node_id:
            return
        peer = self.peers.get(event["resource"])
        if peer is not None and peer.session_id == event["session"]:
            peer.expire_at(float(event["expires"]))
