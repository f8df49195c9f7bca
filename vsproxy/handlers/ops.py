"""Operations endpoints: /health (the original's shape, plus upstream state), /metrics and the
OpenAPI document at /openapi.json."""

from __future__ import annotations

import time

from prometheus_client.exposition import choose_encoder

from .. import __version__
from ..openapi import openapi_document
from ..sessions import iso_utc
from .base import JsonHandler


class HealthHandler(JsonHandler):
    cors_methods = "GET, OPTIONS"
    open_to_any_host = True  # probes use whatever address they have (see HandlerMixin)

    def get(self) -> None:
        sim = self.config.isaac_sim
        hubs = self.hubs.values()
        # Still 200 when degraded: the proxy itself is fine; load balancers should keep it.
        failing = sorted(hub.name for hub in hubs if hub.sessions and hub.down)
        cluster = self.settings.get("vsproxy_cluster")
        # In a cluster: this node, the live nodes, and Redis unreachable also means degraded.
        extra = {"cluster": cluster.health()} if cluster is not None else {}
        degraded = failing or (cluster is not None and not cluster.reachable)
        self.send_json({
            "status": "degraded" if degraded else "healthy",
            "service": "video-stream-proxy",
            "version": __version__,
            "isaac_sim_ip": sim.ip,  # "" without a simulator: the original always sent a string
            "isaac_sim_port": str(sim.port),
            "active_sessions": len(self.sessions),
            "timestamp": iso_utc(time.time()),
            "failing_upstreams": failing,
            "upstreams": [hub.status() for hub in hubs],
            **extra,
        })


class MetricsHandler(JsonHandler):
    """Prometheus text format, or OpenMetrics when the scraper's Accept header asks for it."""

    auth_scope = "metrics"
    open_to_any_host = True  # scrapers use whatever address they have (see HandlerMixin)

    def get(self) -> None:
        encoder, content_type = choose_encoder(self.request.headers.get("Accept", ""))
        self.set_header("Content-Type", content_type)
        self.finish(encoder(self.metrics.registry))


class OpenApiHandler(JsonHandler):
    """GET /openapi.json: the REST API's OpenAPI 3.1 document (vsproxy/openapi.py), with this
    server's public base URL as `servers`. Open, like /health: it describes, it holds no secret."""

    cors_methods = "GET, OPTIONS"

    def get(self) -> None:
        self.send_json(openapi_document(self.public_base_url()))


health_routes = [(r"/health", HealthHandler)]
metrics_routes = [(r"/metrics", MetricsHandler)]
openapi_routes = [(r"/openapi\.json", OpenApiHandler)]
routes = health_routes + metrics_routes + openapi_routes
