"""Prometheus metrics of the service, defined in one place.

The API serves them at `/metrics`; a worker exposes them on `METRICS_PORT` (an exporter thread).
Label values are bounded (sources, statuses, kinds, connection ids) — never customer data.

    from worker.metrics import WEBHOOKS_RECEIVED
    WEBHOOKS_RECEIVED.labels(source="shopify", status="accepted").inc()
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# --- webhook intake (api/) ---------------------------------------------------------------------
WEBHOOKS_RECEIVED = Counter(
    "loyalty_webhooks_received_total",
    "Webhook deliveries answered 2xx/400, by outcome (accepted, duplicate, ignored, invalid).",
    ["source", "status"],
)
WEBHOOKS_REJECTED = Counter(
    "loyalty_webhooks_rejected_total",
    "Webhook deliveries refused before storage (bad_signature, too_large, disabled).",
    ["source", "reason"],
)
WEBHOOKS_DUPLICATED = Counter(
    "loyalty_webhooks_duplicated_total",
    "Webhook deliveries already in the inbox (same delivery id).",
    ["source"],
)

# --- inbox processing (worker/) ----------------------------------------------------------------
EVENTS_PROCESSED = Counter(
    "loyalty_events_processed_total",
    "Inbox events applied to the store.",
    ["source"],
)
EVENTS_FAILED = Counter(
    "loyalty_events_failed_total",
    "Inbox event attempts that failed (retried with backoff, parked as failed at the end).",
    ["source"],
)

# --- syncs -------------------------------------------------------------------------------------
SYNC_RECORDS = Counter(
    "loyalty_sync_records_total",
    "Records handled by customer syncs, by connection and outcome (created, updated, ...).",
    ["source", "connection_id", "outcome"],
)
SYNC_LAG = Gauge(
    "loyalty_sync_lag_seconds",
    "Seconds since the connection's stream last completed a sync (its watermark).",
    ["source", "connection_id", "stream"],
)
UPSTREAM_REQUESTS = Counter(
    "loyalty_upstream_requests_total",
    "HTTP requests to foreign APIs, by source and status class (2xx, 4xx, 5xx, error).",
    ["source", "status"],
)
UPSTREAM_THROTTLES = Counter(
    "loyalty_upstream_throttles_total",
    "Times a foreign API throttled us (429 / THROTTLED) or the rate budget made us wait.",
    ["source"],
)

# --- outbox ------------------------------------------------------------------------------------
OUTBOX_PENDING = Gauge(
    "loyalty_outbox_pending",
    "Outbox rows waiting for delivery, by kind.",
    ["kind"],
)
OUTBOX_FAILED = Gauge(
    "loyalty_outbox_failed",
    "Outbox rows parked as failed, by kind.",
    ["kind"],
)
OUTBOX_DELIVERED = Counter(
    "loyalty_outbox_delivered_total",
    "Outbox deliveries made, by kind and channel (email, sms, shopify, square, pass_service).",
    ["kind", "channel"],
)

# --- stamps ------------------------------------------------------------------------------------
STAMPS_EARNED = Counter(
    "loyalty_stamps_earned_total",
    "Stamps added by orders/payments from a source.",
    ["source"],
)
STAMPS_REVERSED = Counter(
    "loyalty_stamps_reversed_total",
    "Stamps taken back by refunds/cancellations from a source.",
    ["source"],
)
EVENT_LATENCY = Histogram(
    "loyalty_event_latency_seconds",
    "From inbox receipt to applied, per event.",
    ["source"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
