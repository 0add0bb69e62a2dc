"""Prometheus metrics of one server (its own registry: several servers in one process stay apart)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                      30.0, 60.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        labels = {"model_name": model_name}
        self.requests = Counter("portinfer_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("portinfer_prompt_tokens", "Prompt tokens admitted to a slot", registry=r)
        self.generation_tokens = Counter("portinfer_generation_tokens", "Tokens generated", registry=r)
        self.running = Gauge("portinfer_num_requests_running", "Sequences holding a slot (prefilling or decoding)",
                             registry=r)
        self.waiting = Gauge("portinfer_num_requests_waiting", "Sequences queued for a slot", registry=r)
        self.slots_used = Gauge("portinfer_kv_slots_used", "KV-cache slots in use", registry=r)
        self.slots_total = Gauge("portinfer_kv_slots_total", "KV-cache slots (--max-batch)", registry=r)
        self.time_to_first_token = Histogram("portinfer_time_to_first_token_seconds",
                                             "From a sequence's arrival to its first token",
                                             buckets=_LATENCY_BUCKETS_S, registry=r)
        self.inter_token_latency = Histogram("portinfer_inter_token_latency_seconds",
                                             "Between consecutive tokens of a sequence",
                                             buckets=_LATENCY_BUCKETS_S, registry=r)
        info = Gauge("portinfer_model_info", "The served model", list(labels), registry=r)
        info.labels(**labels).set(1)

    def set_state(self, running: int, waiting: int, slots_used: int, slots_total: int):
        self.running.set(running)
        self.waiting.set(waiting)
        self.slots_used.set(slots_used)
        self.slots_total.set(slots_total)

    def render(self) -> bytes:
        return generate_latest(self.registry)
