"""The front's Prometheus metrics: histograms, so percentiles can be computed.

TorchServe's ``TimeToFirstTokenMs`` and the like are gauges holding the last request's
value; these are measured where the client sees them, per app and status. The metrics
port serves them followed by TorchServe's own text (``ts_*`` and the handler's metrics),
so one scrape gets both.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds, from a one-token answer on a GPU to Vertex's 60 s and our 300 s response timeout.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
WAIT_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30)
HEAL_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 900)


class FrontMetrics:
    """One registry per front, so two fronts in one process (tests) do not clash."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "llm_front_request_seconds",
            "Time from a request's arrival to the last byte of its answer",
            ("app", "status"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "llm_front_time_to_first_byte_seconds",
            "Streaming answers: time from the request's arrival to the first byte of the stream (first token)",
            ("app", "status"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "llm_front_queue_wait_seconds",
            "Time a request waited in the front for a connection to TorchServe"
            " (TorchServe's own queue time is its ts_queue_latency_microseconds)",
            ("app", "status"),
            buckets=WAIT_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "llm_front_requests_in_flight",
            "Predictions the front is relaying now",
            ("app",),
            registry=self.registry,
        )
        self.heals = Counter(
            "llm_front_heals",
            "Times the front brought an app back, by cause and by how",
            ("app", "cause", "method"),
            registry=self.registry,
        )
        self.heal_seconds = Histogram(
            "llm_front_heal_seconds",
            "From a worker's death to an app that answers again",
            ("app", "method"),
            buckets=HEAL_BUCKETS,
            registry=self.registry,
        )
        self.healing = Gauge(
            "llm_front_healing",
            "1 while the front is bringing an app back",
            ("app",),
            registry=self.registry,
        )
        self.replays = Counter(
            "llm_front_replays",
            "Predictions sent again after their worker died before a byte of the answer went out, by how"
            " the replay ended: answered, lost-again (a second death: a suspected poison request, 507),"
            " not-served (no worker in time), client-left",
            ("app", "outcome"),
            registry=self.registry,
        )
        self.heal_waits = Counter(
            "llm_front_heal_waits",
            "Predictions that arrived while their app healed, by how the wait ended: served, full"
            " (LLM_HEAL_WAIT_REQUESTS were waiting: 503), timeout (LLM_HEAL_WAIT_S: 503), client-left",
            ("app", "outcome"),
            registry=self.registry,
        )
        self.disconnects = Counter(
            "llm_front_client_disconnects",
            "Clients that went away before their answer was complete",
            ("app",),
            registry=self.registry,
        )

        self.cancels = Counter(
            "llm_front_cancels_sent",
            "Clients that went away whose generation the front told the app's workers to stop",
            ("app",),
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
