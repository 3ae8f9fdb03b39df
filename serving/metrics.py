"""Prometheus metrics, named after vLLM's (`vllm:time_to_first_token_seconds` ->
`flaxstream:time_to_first_token_seconds`), so existing dashboards need only the prefix changed.

Latencies are measured from the moment the API accepted the request, so queue time is part
of TTFT and end-to-end latency, as a client sees them. Each server owns its registry (not the
process-global one), so several apps can live in one process, as in tests.
"""

from __future__ import annotations

import prometheus_client as prom

# Bucket edges in seconds: tokens arrive every few ms on a small model and requests can
# queue for minutes under load, so the ranges span both.
_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
            7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
_TOKEN_GAP = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
              0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class Metrics:
  """Every series carries the label model_name, as vLLM's do."""

  def __init__(self, model_name: str):
    self.registry = reg = prom.CollectorRegistry()
    lab = ["model_name"]

    def histogram(name, doc, buckets):
      return prom.Histogram(f"flaxstream:{name}", doc, lab, buckets=buckets,
                            registry=reg).labels(model_name)

    def gauge(name, doc):
      return prom.Gauge(f"flaxstream:{name}", doc, lab, registry=reg).labels(model_name)

    def counter(name, doc):  # the exposition appends "_total"
      return prom.Counter(f"flaxstream:{name}", doc, lab, registry=reg).labels(model_name)

    self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", _LATENCY)
    self.itl = histogram("inter_token_latency_seconds", "Time between consecutive tokens.",
                         _TOKEN_GAP)
    self.e2e = histogram("e2e_request_latency_seconds", "Request latency, accept to last token.",
                         _LATENCY)
    self.queue = histogram("request_queue_time_seconds", "Time waiting for a free slot.",
                           _LATENCY)
    self.running = gauge("num_requests_running", "Requests holding a slot.")
    self.waiting = gauge("num_requests_waiting", "Requests accepted and waiting for a slot.")
    self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV cache slots in use (0..1).")
    self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of accepted requests.")
    self.generation_tokens = counter("generation_tokens", "Generated tokens.")
    self.disconnects = counter("client_disconnects",
                               "Requests aborted because the client went away.")
    self.slow_client_drops = counter("slow_client_drops",
                                     "Requests dropped because the client stopped reading.")
    self.rejected = counter("requests_rejected_queue_full", "Requests refused with 429.")
    self.finished = prom.Counter("flaxstream:request_success", "Finished requests by reason.",
                                 ["model_name", "finished_reason"], registry=reg)
    self._model_name = model_name

  def finish(self, reason: str):
    self.finished.labels(self._model_name, reason).inc()

  def exposition(self) -> tuple[bytes, str]:
    return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST
