"""Prometheus metrics of the app and gateway, served at ``/metrics``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

registry = CollectorRegistry(auto_describe=True)

ws_connections = Gauge("ps_ws_connections", "Open WebSocket connections", registry=registry)
ws_rooms = Gauge("ps_ws_rooms", "Rooms with local members on this process", registry=registry)
ws_messages_in = Counter("ps_ws_messages_in_total", "Client messages received", ["type"], registry=registry)
ws_messages_out = Counter("ps_ws_messages_out_total", "Messages delivered to clients", registry=registry)
ws_frames_out = Counter("ps_ws_frames_out_total", "Frames sent to clients", registry=registry)
ws_closes = Counter("ps_ws_closes_total", "Connections closed by the server, by code", ["code"], registry=registry)
ws_outbox_bytes = Gauge("ps_ws_outbox_bytes", "Encoded bytes waiting in all outboxes", registry=registry)
hub_lag = Histogram(
    "ps_hub_lag_seconds",
    "Time from event append to hub read",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=registry,
)
hub_reads = Counter("ps_hub_reads_total", "XREAD calls made by the hub", registry=registry)
jobs_submitted = Counter("ps_jobs_submitted_total", "Jobs submitted", registry=registry)
http_errors = Counter("ps_http_client_errors_total", "4xx answers by status", ["status"], registry=registry)
outages = Counter(
    "ps_dependency_outages_total", "Requests refused because the store or Redis was unavailable", ["dependency"], registry=registry
)
ws_client_frame_errors = Counter(
    "ps_ws_client_frame_errors_total", "Malformed client frames closed by the WebSocket layer, by kind", ["kind"], registry=registry
)
hooks_received = Counter(
    "ps_hooks_received_total", "Claude Code hook posts accepted, by outcome (queued, busy)", ["outcome"], registry=registry
)
hook_seconds = Histogram(
    "ps_hook_request_seconds",
    "Time to answer an accepted hook post (auth, decode, claim, queue)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
    registry=registry,
)
