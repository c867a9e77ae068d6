"""Prometheus metrics, one registry per application instance (tests build many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """All metrics the service exports, in base units with Prometheus naming."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests_total = Counter(
            "gradcam_http_requests_total",
            "HTTP requests by endpoint, method and status.",
            ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.request_duration_seconds = Histogram(
            "gradcam_http_request_duration_seconds",
            "HTTP request latency by endpoint, method and status.",
            ["endpoint", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.caller_requests_total = Counter(
            "gradcam_caller_requests_total",
            "HTTP requests by caller (the short id of an API key) and status; with API keys only.",
            ["caller", "status"],
            registry=self.registry,
        )
        self.in_flight_requests = Gauge(
            "gradcam_http_requests_in_flight",
            "HTTP requests being served now.",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "gradcam_batch_size",
            "Images per batch run on a worker, by model and kind (predict/explain).",
            ["model", "kind"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "gradcam_queue_depth",
            "Images waiting for a worker, by model.",
            ["model"],
            registry=self.registry,
        )
        self.batch_duration_seconds = Histogram(
            "gradcam_batch_duration_seconds",
            "Time a worker spends on one batch, by model and kind.",
            ["model", "kind"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.worker_errors_total = Counter(
            "gradcam_worker_errors_total",
            "Batches that failed inside a worker, by model and error type.",
            ["model", "error"],
            registry=self.registry,
        )
        self.predicted_wait_seconds = Gauge(
            "gradcam_predicted_wait_seconds",
            "Queue wait predicted for the latest request at admission, by model.",
            ["model"],
            registry=self.registry,
        )
        self.admitted_total = Counter(
            "gradcam_admitted_total",
            "Images admitted to a model's queue, by model.",
            ["model"],
            registry=self.registry,
        )
        self.rejected_total = Counter(
            "gradcam_rejected_total",
            "Refusals by model and reason: images refused before compute (overloaded,"
            " queue_wait, caller_limit) and requests past their deadline (deadline).",
            ["model", "reason"],
            registry=self.registry,
        )
        self.long_jobs = Gauge(
            "gradcam_long_jobs",
            "Long jobs (Score-CAM, faithfulness scores) by model and state (running, queued).",
            ["model", "state"],
            registry=self.registry,
        )
        self.long_job_remaining_seconds = Gauge(
            "gradcam_long_job_remaining_seconds",
            "Predicted seconds of the long jobs running (what remains) and queued, by model.",
            ["model"],
            registry=self.registry,
        )
        self.abandoned_total = Counter(
            "gradcam_abandoned_jobs_total",
            "Long jobs stopped between two chunks because nobody waited for them any more"
            " (the caller went away or its deadline passed), by model.",
            ["model"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
