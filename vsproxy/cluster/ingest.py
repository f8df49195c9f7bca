"""Frames POSTed to a node that does not have the push upstream's publisher go to the node that has.

A POSTing publisher behind a load balancer without stickiness reaches every node in turn, and one
node publishes: the one holding the upstream's lease (its origin, `ClusterSource`). A node that
gets `POST /ingest/{upstream}/frame` checks it as if it were to publish it (the publish token,
the body's size, a JPEG, the capture time: nothing refused is ever forwarded), then, when another
live node holds the lease, POSTs the frame to that node's `/internal/ingest/{upstream}/frame`
(`ForwardedFrameHandler`, authenticated with cluster.token like the relay) and answers the
publisher with that node's answer. The frame travels byte for byte (a capture time stamped into
it stays there), with the publisher's `X-Capture-Timestamp`, or, for a frame with neither, its
arrival at the first node as that header: frame age counts as if it had been published there.

Loop safety: a forwarded frame is never forwarded again. Its receiver publishes it as it would a
direct POST: it holds the lease, or takes it when it is free (then it is where the publisher's
frames arrive), and answers 409 when a third node holds it (the lease moved meanwhile).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from tornado.httpclient import HTTPRequest

from .. import render
from ..errors import ClientError, describe_error
from ..handlers.ingest import IngestFrameHandler, check_publisher_here

if TYPE_CHECKING:
    from .node import Cluster

FORWARD_TIMEOUT_SECONDS = 2.0  # connect and answer; a publisher gets a 503 after this long at most
# The holder's answers a publisher gets as they are: those a direct POST can get. Any other (401:
# the nodes' cluster.token differ; 404: their upstreams differ; a 500) is the cluster's fault,
# nothing the publisher can mend: a 503.
PASSED_ON = frozenset((200, 400, 409, 413, 503))


class PublisherUnreachable(ClientError):
    """In a cluster, a frame for the node that has a push upstream's publisher cannot be delivered
    there (unreachable, timed out, not registered, or it refused the forward itself): 503."""

    status = 503


async def forward_frame(cluster: Cluster, holder: str, url: str, upstream: str, frame: bytes,
                        captured: float | None) -> tuple[int, dict]:
    """POST a checked frame to `holder` (at `url`), which has the upstream's publisher: its answer
    (status, JSON body), or PublisherUnreachable."""
    headers = {**cluster.node_headers(), "Content-Type": "image/jpeg"}
    if captured is None and render.stamped_capture_time(frame) is None:
        captured = time.time()  # arrival here, as if it were published here
    if captured is not None:
        headers["X-Capture-Timestamp"] = repr(captured)
    request = HTTPRequest(f"{url}/internal/ingest/{upstream}/frame", method="POST", body=frame, headers=headers,
                          connect_timeout=FORWARD_TIMEOUT_SECONDS, request_timeout=FORWARD_TIMEOUT_SECONDS,
                          follow_redirects=False)
    where = f"Node {holder}, which has the publisher of upstream '{upstream}',"
    try:
        response = await cluster.http.fetch(request, raise_error=False)
    except Exception as exc:  # noqa: BLE001 - refused, reset, timed out: no answer at all
        raise PublisherUnreachable(f"{where} cannot be reached ({describe_error(exc)}); try again shortly") from None
    answer = _json_object(response.body)
    if response.code in PASSED_ON and answer is not None:
        return response.code, answer
    error = answer.get("error") if answer is not None else None
    raise PublisherUnreachable(f"{where} did not take the frame (HTTP {response.code}"
                               + (f": {str(error)[:200]}" if error else "") + ")")


def _json_object(body: bytes | None) -> dict | None:
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


class ForwardedFrameHandler(IngestFrameHandler):
    """POST /internal/ingest/{upstream}/frame: a frame another node checked and forwarded here,
    because this node holds the upstream's lease (see the module docstring). Node to node only:
    cluster.token, no publish token. Published here, or refused; never forwarded again."""

    # The other nodes reach this one by its advertise URL, whose host need not be one of
    # server.allowed_hosts; the cluster token is what makes the request safe (no browser has it).
    open_to_any_host = True
    unauthorized_reason = "Missing or wrong cluster token"

    def authorized(self) -> bool:
        cluster: Cluster = self.settings["vsproxy_cluster"]
        return cluster.from_a_node(self.request.headers.get("Authorization"))

    async def elsewhere(self, frame: bytes, captured: float | None) -> None:
        # Here (this node holds the lease, or takes it: free) or a 409/503 as for a direct POST.
        await check_publisher_here(self.hub)


routes = [(r"/internal/ingest/(?P<upstream>[A-Za-z0-9][A-Za-z0-9._-]{0,63})/frame", ForwardedFrameHandler)]
