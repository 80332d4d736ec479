"""Prometheus metrics, one CollectorRegistry per app (two apps in one process do not mix their counts).

Counters and histograms are updated as requests run; the engine's state (queue, running sequences, KV blocks,
prefix-cache hits) is read at scrape time on each engine's thread between steps (`runner.call`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1, 2.5)


def engine_snapshot(core) -> dict:
    """What the engine holds now (run on the engine thread)."""
    st = core.blocks.stats()
    return {"running": len(core.scheduler.running), "waiting": len(core.scheduler.waiting), "idle": len(core.idle),
            "groups": st["groups"], "hit_tokens": st["hit_tokens"], "miss_tokens": st["miss_tokens"],
            "speculative": core.drafter is not None, "drafted": core.n_drafted, "accepted": core.n_accepted}


class _EngineCollector:
    def __init__(self, models):
        self.models = models   # name -> bridge

    def collect(self):
        running = GaugeMetricFamily("edgellm_running_sequences", "Sequences in the running batch", labels=["model"])
        waiting = GaugeMetricFamily("edgellm_queue_depth", "Sequences waiting for a place in the batch",
                                    labels=["model"])
        idle = GaugeMetricFamily("edgellm_idle_sequences", "Finished sequences kept for cache reuse",
                                 labels=["model"])
        blocks = GaugeMetricFamily("edgellm_kv_blocks", "KV blocks by state (used: referenced; cached: evictable "
                                   "prefix-cache blocks; free)", labels=["model", "group", "state"])
        hits = CounterMetricFamily("edgellm_prefix_cache_hit_tokens", "Prompt tokens whose KV came from the "
                                   "prefix cache", labels=["model"])
        miss = CounterMetricFamily("edgellm_prefix_cache_miss_tokens", "Prompt tokens evaluated", labels=["model"])
        drafted = CounterMetricFamily("edgellm_draft_tokens", "Tokens drafted for speculative decoding",
                                      labels=["model"])
        accepted = CounterMetricFamily("edgellm_draft_accepted_tokens", "Drafted tokens the model kept",
                                       labels=["model"])
        rate = GaugeMetricFamily("edgellm_draft_acceptance_rate", "Accepted over drafted tokens since start",
                                 labels=["model"])
        for name, bridge in self.models.items():
            try:
                s = bridge.snapshot()
            except Exception:   # a closed engine: leave it out of this scrape
                continue
            running.add_metric([name], s["running"])
            waiting.add_metric([name], s["waiting"])
            idle.add_metric([name], s["idle"])
            for g, grp in enumerate(s["groups"]):
                for state in ("used", "free", "cached"):
                    blocks.add_metric([name, str(g), state], grp[state])
            hits.add_metric([name], s["hit_tokens"])
            miss.add_metric([name], s["miss_tokens"])
            if s["speculative"]:
                drafted.add_metric([name], s["drafted"])
                accepted.add_metric([name], s["accepted"])
                rate.add_metric([name], s["accepted"] / s["drafted"] if s["drafted"] else 0.0)
        yield from (running, waiting, idle, blocks, hits, miss, drafted, accepted, rate)


class Metrics:
    def __init__(self, models: dict):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("edgellm_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("edgellm_prompt_tokens", "Prompt tokens", ["model"], registry=r)
        self.generated_tokens = Counter("edgellm_generation_tokens", "Generated tokens", ["model"], registry=r)
        self.ttft = Histogram("edgellm_time_to_first_token_seconds", "Arrival to first token", ["model"],
                              buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("edgellm_time_per_output_token_seconds", "Seconds per generated token after the "
                              "first", ["model"], buckets=_TPOT_BUCKETS, registry=r)
        self.duration = Histogram("edgellm_request_duration_seconds", "Whole request time", ["route"],
                                  buckets=_TTFT_BUCKETS + (120, 300), registry=r)
        self.rejected = Counter("edgellm_rejected_requests", "Requests turned away (auth, rate, queue, size)",
                                ["reason"], registry=r)
        r.register(_EngineCollector(models))

    def render(self) -> bytes:
        return generate_latest(self.registry)
