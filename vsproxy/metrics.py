"""Prometheus metrics, all in one place (naming: https://prometheus.io/docs/practices/naming/).

Streaming counters are plain integers on the hubs and sessions, read by a collector at scrape
time, so the per-frame path pays nothing for them. Labels are bounded: configured upstream names
and transports, never session or user IDs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from .outputs import TRANSPORTS, LatencyBuckets

if TYPE_CHECKING:
    import tornado.web

    from .cluster import Cluster
    from .hub import FrameHub
    from .sessions import SessionManager

HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class ProxyCollector(Collector):
    """Reads sessions, viewers, upstream state and frame counters from the live objects."""

    def __init__(self, sessions: SessionManager, hubs: dict[str, FrameHub], max_sessions: int,
                 cluster: Cluster | None = None) -> None:
        self.sessions = sessions
        self.hubs = hubs
        self.max_sessions = max_sessions
        self.cluster = cluster  # a cluster node (cluster.redis_url) also reports the cluster_* metrics

    def collect(self) -> Iterable:
        sessions = self.sessions
        hubs = list(self.hubs.values())

        yield GaugeMetricFamily("vsproxy_sessions", "Sessions that exist now.", value=len(sessions))
        yield GaugeMetricFamily("vsproxy_sessions_max", "Configured maximum number of sessions.",
                                value=self.max_sessions)
        yield CounterMetricFamily("vsproxy_sessions_created", "Sessions created.", value=sessions.created_total)
        destroyed = CounterMetricFamily("vsproxy_sessions_destroyed",
                                        f"Sessions destroyed, by reason ({', '.join(sessions.DESTROY_REASONS)}).",
                                        labels=["reason"])
        for reason in sessions.DESTROY_REASONS:
            destroyed.add_metric([reason], sessions.destroyed_total[reason])
        yield destroyed

        viewers = GaugeMetricFamily("vsproxy_viewers", "Connected viewers, by transport.", labels=["transport"])
        counts = [h.viewer_counts() for h in hubs]
        for transport in TRANSPORTS:
            viewers.add_metric([transport], sum(c[transport] for c in counts))
        yield viewers

        connected = GaugeMetricFamily("vsproxy_upstream_connected",
                                      "1 if the upstream connection is up, else 0.", labels=["upstream"])
        running = GaugeMetricFamily("vsproxy_upstream_active",
                                    "1 if the upstream is wanted (has sessions or lingers), else 0.",
                                    labels=["upstream"])
        connects = CounterMetricFamily("vsproxy_upstream_connects", "Successful upstream connections.",
                                       labels=["upstream"])
        failures = CounterMetricFamily("vsproxy_upstream_failures",
                                       "Upstream connections lost or attempts failed.", labels=["upstream"])
        frames_in = CounterMetricFamily("vsproxy_upstream_frames_received", "Frames received from the upstream.",
                                        labels=["upstream"])
        bytes_in = CounterMetricFamily("vsproxy_upstream_received_bytes", "JPEG bytes received from the upstream.",
                                       labels=["upstream"])
        for hub in hubs:
            connected.add_metric([hub.name], 1 if hub.connected else 0)
            running.add_metric([hub.name], 1 if hub.running else 0)
            connects.add_metric([hub.name], hub.connects)
            failures.add_metric([hub.name], hub.failures)
            frames_in.add_metric([hub.name], hub.rate_in.total_events)
            bytes_in.add_metric([hub.name], hub.rate_in.total_bytes)
        yield from (connected, running, connects, failures, frames_in, bytes_in)

        # The shared H.264 encoder of JPEG upstreams (one per upstream, while H.264 viewers watch).
        encoding = GaugeMetricFamily("vsproxy_encoder_running", "1 if the upstream's H.264 encoder runs, else 0.",
                                     labels=["upstream"])
        encoded = CounterMetricFamily("vsproxy_encoder_frames", "Frames encoded to H.264.", labels=["upstream"])
        encode_seconds = CounterMetricFamily("vsproxy_encoder_busy_seconds",
                                             "Time the H.264 encoder spent decoding JPEG and encoding.",
                                             labels=["upstream"])
        starts = CounterMetricFamily("vsproxy_encoder_starts", "H.264 encoder (re)starts.", labels=["upstream"])
        restarts = CounterMetricFamily("vsproxy_encoder_failures",
                                       "Unexpected H.264 encoder errors, each followed by new codecs.",
                                       labels=["upstream"])
        for hub in hubs:
            encoder = hub.encoder
            encoding.add_metric([hub.name], 1 if encoder is not None and encoder.running else 0)
            encoded.add_metric([hub.name], encoder.frames_encoded if encoder else 0)
            encode_seconds.add_metric([hub.name], encoder.encode_seconds if encoder else 0.0)
            starts.add_metric([hub.name], encoder.starts if encoder else 0)
            restarts.add_metric([hub.name], encoder.restarts if encoder else 0)
        yield from (encoding, encoded, encode_seconds, starts, restarts)

        frames_sent = CounterMetricFamily("vsproxy_frames_sent", "Frames written to viewers.", labels=["transport"])
        bytes_sent = CounterMetricFamily("vsproxy_sent_bytes", "Bytes of frames written to viewers (wire format).",
                                         labels=["transport"])
        dropped = CounterMetricFamily("vsproxy_frames_dropped",
                                      "Frames skipped for viewers that could not keep up.", labels=["transport"])
        latency = HistogramMetricFamily("vsproxy_frame_write_latency_seconds",
                                        "Time from a frame's arrival to its write to a viewer's socket.",
                                        labels=["transport"])
        age = HistogramMetricFamily("vsproxy_frame_age_seconds",
                                    "Time from a frame's capture (the publisher's timestamp, an RTSP "
                                    "server's RTCP sender-report time, else its arrival) to its write "
                                    "to a viewer's socket, encoding included.",
                                    labels=["transport"])
        for transport in TRANSPORTS:
            stats = [h.stats[transport] for h in hubs]
            frames_sent.add_metric([transport], sum(s.frames_sent for s in stats))
            bytes_sent.add_metric([transport], sum(s.bytes_sent for s in stats))
            dropped.add_metric([transport], sum(s.frames_dropped for s in stats))
            latency.add_metric([transport], *_buckets([s.latency for s in stats]))
            age.add_metric([transport], *_buckets([s.age for s in stats]))
        yield from (frames_sent, bytes_sent, dropped, latency, age)
        if self.cluster is not None:
            yield from self._cluster_metrics(self.cluster)

    def _cluster_metrics(self, cluster: Cluster) -> Iterable:
        """This node's view of the cluster (what its last heartbeat saw) and its upstreams' roles."""
        yield GaugeMetricFamily("vsproxy_cluster_nodes", "Nodes registered in the cluster (this one included).",
                                value=len(cluster.nodes))
        yield GaugeMetricFamily("vsproxy_cluster_redis_up", "1 if this node reaches the cluster's Redis, else 0.",
                                value=1 if cluster.reachable else 0)
        origin = GaugeMetricFamily("vsproxy_cluster_origin",
                                   "1 if this node is the upstream's origin (holds its lease), else 0.",
                                   labels=["upstream"])
        edges = GaugeMetricFamily("vsproxy_cluster_edges", "Edge nodes relaying the upstream from this node.",
                                  labels=["upstream"])
        relay_frames = CounterMetricFamily("vsproxy_cluster_relay_frames_received",
                                           "Frames this node received from the upstream's origin, as an edge.",
                                           labels=["upstream"])
        relay_bytes = CounterMetricFamily("vsproxy_cluster_relay_received_bytes",
                                          "Bytes this node received from the upstream's origin, as an edge.",
                                          labels=["upstream"])
        for name, source in cluster.sources.items():
            origin.add_metric([name], 1 if source.role == "origin" else 0)
            edges.add_metric([name], len(cluster.relays.get(name, ())))
            relay_frames.add_metric([name], source.relay_frames)
            relay_bytes.add_metric([name], source.relay_bytes)
        yield from (origin, edges, relay_frames, relay_bytes)


def _buckets(histograms: list[LatencyBuckets]) -> tuple[list[tuple[str, int]], float]:
    """Summed LatencyBuckets as Prometheus histogram buckets (cumulative) and their sum."""
    counts = [sum(h.counts[i] for h in histograms) for i in range(len(LatencyBuckets.BOUNDS) + 1)]
    cumulative, buckets = 0, []
    for bound, count in zip((*LatencyBuckets.BOUNDS, float("inf")), counts, strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
    return buckets, sum(h.total for h in histograms)


HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})


def method_name(method: str | None) -> str:
    """The request method as a label and log field: a standard method, else "other".

    Tornado accepts any token as a method; a client inventing a new one per request would
    otherwise grow the metrics registry by two series each time, and fill the log with its text.
    """
    return method if method in HTTP_METHODS else "other"


class Metrics:
    """The registry and the metrics recorded outside the streaming path (HTTP requests)."""

    def __init__(self, collector: Collector, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.registry.register(collector)
        self.http_requests = Counter(
            "vsproxy_http_requests", "HTTP requests, by handler, method and status code.",
            ["handler", "method", "code"], registry=self.registry)
        self.http_duration = Histogram(
            "vsproxy_http_request_duration_seconds", "HTTP request duration (streams: their whole life).",
            ["handler", "method"], buckets=HTTP_BUCKETS, registry=self.registry)

    def observe_request(self, handler: tornado.web.RequestHandler) -> None:
        # The handler class, not the URL, keeps the label bounded (URLs carry session IDs).
        name = type(handler).__name__
        method = method_name(handler.request.method)
        self.http_requests.labels(name, method, str(handler.get_status())).inc()
        self.http_duration.labels(name, method).observe(handler.request.request_time())
