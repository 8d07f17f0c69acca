"""Prometheus metrics of the server: counts, queue, batch, latencies and tokens — never content.
Each server has its own registry (labels come from fixed sets: routes, served model names)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The server's counters, gauges and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "openafm_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.queue_depth = Gauge("openafm_queue_depth", "Requests waiting for a row", registry=r)
        self.batch_size = Gauge("openafm_batch_size", "Rows decoding now", registry=r)
        self.batch_rows = Histogram(
            "openafm_step_batch_rows",
            "Rows per decode step",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.ttft = Histogram(
            "openafm_time_to_first_token_seconds",
            "From request to first token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "openafm_inter_token_latency_seconds",
            "Between streamed pieces",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "openafm_prompt_tokens", "Prompt tokens processed", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            "openafm_generation_tokens", "Tokens generated", ["model"], registry=r
        )
        self.blocked_writes = Counter(
            "openafm_blocked_file_writes",
            "File opens for writing refused by private mode while serving",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
