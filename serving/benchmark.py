"""Load benchmark over real HTTP streaming: Poisson arrivals at a rate, or a fixed concurrency.

  python -m serving.benchmark --url=http://127.0.0.1:8000 --rate=4 --num_requests=200
  python -m serving.benchmark --concurrency=8 --num_requests=100 --out=bench.json --plot=bench.png

Each request streams /v1/completions (or /v1/chat/completions with --chat) with `logprobs=0`,
which makes the server send one chunk per token, so chunk arrival times are token times:
  TTFT  request sent -> first token
  ITL   gaps between consecutive tokens of a request
  TPOT  (latency - TTFT) / (output tokens - 1), per request
  goodput  requests per second that met both SLOs (--slo_ttft_ms, --slo_tpot_ms)
Both modes stop after --num_requests or --duration seconds, whichever comes first;
requests still running at the deadline are cancelled and counted as failed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import sys
import time

from absl import app, flags

_URL = flags.DEFINE_string("url", "http://127.0.0.1:8000", "Server base URL.")
_RATE = flags.DEFINE_float("rate", None, "Poisson arrival rate, requests/s (default: use "
                           "--concurrency).", lower_bound=0.001)
_CONCURRENCY = flags.DEFINE_integer("concurrency", 4, "Requests in flight (when no --rate).",
                                    lower_bound=1)
_NUM = flags.DEFINE_integer("num_requests", 64, "Requests to send.", lower_bound=1)
_DURATION = flags.DEFINE_float("duration", 600.0, "Stop after this many seconds.", lower_bound=1)
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 128, "Tokens per request.", lower_bound=1)
_PROMPT_WORDS = flags.DEFINE_integer("prompt_words", 32, "Words in each synthetic prompt.",
                                     lower_bound=1)
_CHAT = flags.DEFINE_bool("chat", False, "Use /v1/chat/completions.")
_IGNORE_EOS = flags.DEFINE_bool("ignore_eos", True, "Generate exactly --max_tokens tokens.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature.")
_SLO_TTFT = flags.DEFINE_float("slo_ttft_ms", 1000.0, "Goodput: TTFT limit.")
_SLO_TPOT = flags.DEFINE_float("slo_tpot_ms", 100.0, "Goodput: TPOT limit.")
_API_KEY = flags.DEFINE_string("api_key", None, "Bearer key, if the server needs one.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the arrival times and prompts.")
_OUT = flags.DEFINE_string("out", "benchmark.json", "Where to write the JSON results.")
_PLOT = flags.DEFINE_string("plot", "benchmark.png", "Where to write the PNG plot ('' = none).")

_WORDS = ("the quick brown fox jumps over lazy dog river mountain light story keeper "
          "stream token model cache window slot engine tells about a small town").split()


@dataclasses.dataclass
class Result:
  start: float  # seconds since the benchmark began
  ok: bool = False
  error: str = ""
  ttft: float = 0.0
  latency: float = 0.0
  output_tokens: int = 0
  token_times: list = dataclasses.field(default_factory=list)  # since the request was sent

  @property
  def itls(self) -> list[float]:
    return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

  @property
  def tpot(self) -> float | None:
    if self.output_tokens < 2:
      return None
    return (self.latency - self.ttft) / (self.output_tokens - 1)


def make_body(model: str, rng: random.Random) -> tuple[str, dict]:
  text = " ".join(rng.choice(_WORDS) for _ in range(_PROMPT_WORDS.value))
  body = {"model": model, "max_tokens": _MAX_TOKENS.value, "temperature": _TEMPERATURE.value,
          "stream": True, "stream_options": {"include_usage": True},
          "ignore_eos": _IGNORE_EOS.value}
  if _CHAT.value:
    return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": text}],
                                    "logprobs": True}
  return "/v1/completions", {**body, "prompt": text, "logprobs": 0}


async def one_request(client, path: str, body: dict, t0: float) -> Result:
  import httpx
  sent = time.perf_counter()
  result = Result(start=sent - t0)
  try:
    async with client.stream("POST", path, json=body) as response:
      if response.status_code != 200:
        result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
        return result
      async for line in response.aiter_lines():
        if not line.startswith("data: "):
          continue
        data = line[6:]
        if data == "[DONE]":
          break
        chunk = json.loads(data)
        if "error" in chunk:
          result.error = chunk["error"]["message"]
          return result
        if chunk.get("usage"):
          result.output_tokens = chunk["usage"]["completion_tokens"]
        if any(c.get("logprobs") for c in chunk["choices"]):  # one chunk per token
          result.token_times.append(time.perf_counter() - sent)
    result.latency = time.perf_counter() - sent
    result.ttft = result.token_times[0] if result.token_times else result.latency
    result.ok = True
  except (httpx.HTTPError, asyncio.TimeoutError) as e:
    result.error = f"{type(e).__name__}: {e}"
  return result


async def run_load(model: str) -> tuple[list[Result], float]:
  import httpx
  rng = random.Random(_SEED.value)
  headers = {"Authorization": f"Bearer {_API_KEY.value}"} if _API_KEY.value else {}
  limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
  results: list[Result] = []
  async with httpx.AsyncClient(base_url=_URL.value, headers=headers, limits=limits,
                               timeout=httpx.Timeout(_DURATION.value + 30)) as client:
    t0 = time.perf_counter()
    deadline = t0 + _DURATION.value

    async def send():
      path, body = make_body(model, rng)
      results.append(await one_request(client, path, body, t0))

    tasks = []
    if _RATE.value:  # open loop: arrivals do not wait for earlier requests
      for _ in range(_NUM.value):
        tasks.append(asyncio.create_task(send()))
        await asyncio.sleep(rng.expovariate(_RATE.value))
        if time.perf_counter() > deadline:
          break
    else:  # closed loop: each worker sends its next request when the last one ends
      counter = iter(range(_NUM.value))

      async def worker():
        for _ in counter:
          if time.perf_counter() > deadline:
            return
          await send()
      tasks = [asyncio.create_task(worker()) for _ in range(_CONCURRENCY.value)]
    done, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
    for t in pending:
      t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    elapsed = time.perf_counter() - t0
  cut = len(pending)  # each unfinished task had one request in flight
  results += [Result(start=0.0, error="cancelled at the deadline") for _ in range(cut)]
  return results, elapsed


def percentiles(values: list[float], scale: float = 1000.0) -> dict:
  import numpy as np
  if not values:
    return {"mean": None, "p50": None, "p90": None, "p99": None}
  v = np.asarray(values) * scale
  return {"mean": float(v.mean()), **{f"p{q}": float(np.percentile(v, q)) for q in (50, 90, 99)}}


def summarize(results: list[Result], elapsed: float) -> dict:
  ok = [r for r in results if r.ok]
  slo_ok = [r for r in ok if r.ttft * 1000 <= _SLO_TTFT.value
            and (r.tpot is None or r.tpot * 1000 <= _SLO_TPOT.value)]
  tokens = sum(r.output_tokens for r in ok)
  return {
      "config": {"url": _URL.value, "mode": "poisson" if _RATE.value else "concurrency",
                 "rate": _RATE.value, "concurrency": None if _RATE.value else _CONCURRENCY.value,
                 "num_requests": _NUM.value, "max_tokens": _MAX_TOKENS.value,
                 "prompt_words": _PROMPT_WORDS.value, "chat": _CHAT.value,
                 "slo_ttft_ms": _SLO_TTFT.value, "slo_tpot_ms": _SLO_TPOT.value},
      "completed": len(ok), "failed": len(results) - len(ok),
      "errors": sorted({r.error for r in results if not r.ok})[:10],
      "duration_s": elapsed,
      "request_throughput": len(ok) / elapsed,
      "total_output_tokens": tokens,
      "output_tokens_per_s": tokens / elapsed,
      "goodput_requests_per_s": len(slo_ok) / elapsed,
      "ttft_ms": percentiles([r.ttft for r in ok]),
      "tpot_ms": percentiles([r.tpot for r in ok if r.tpot is not None]),
      "itl_ms": percentiles([x for r in ok for x in r.itls]),
      "e2e_ms": percentiles([r.latency for r in ok]),
      "requests": [dataclasses.asdict(r) for r in results],
  }


def plot(summary: dict, results: list[Result], path: str):
  import matplotlib
  matplotlib.use("Agg")  # files only, no display
  import matplotlib.pyplot as plt
  import numpy as np
  ok = [r for r in results if r.ok]
  fig, axes = plt.subplots(2, 2, figsize=(11, 8))
  series = [("TTFT", [r.ttft for r in ok]), ("TPOT", [r.tpot for r in ok if r.tpot]),
            ("ITL", [x for r in ok for x in r.itls])]
  for ax, (name, values) in zip(axes.flat, series):
    v = np.sort(np.asarray(values) * 1000)
    if len(v):
      ax.plot(v, np.arange(1, len(v) + 1) / len(v))
      for q in (50, 90, 99):
        ax.axvline(np.percentile(v, q), ls=":", color="gray")
    ax.set(title=f"{name} CDF (dotted: p50/p90/p99)", xlabel="ms", ylabel="fraction")
  ax = axes.flat[3]
  times = np.asarray([r.start + t for r in ok for t in r.token_times])
  if len(times):
    bins = np.arange(0, times.max() + 1.0, 1.0)
    ax.hist(times, bins=bins)
  ax.set(title=f"output tokens/s over time (mean {summary['output_tokens_per_s']:.1f})",
         xlabel="s since start", ylabel="tokens in each 1 s")
  mode = summary["config"]["mode"]
  load = f"rate {_RATE.value}/s" if mode == "poisson" else f"concurrency {_CONCURRENCY.value}"
  fig.suptitle(f"flaxstream benchmark: {load}, {summary['completed']} ok, "
               f"{summary['failed']} failed, goodput {summary['goodput_requests_per_s']:.2f} req/s")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import httpx
  headers = {"Authorization": f"Bearer {_API_KEY.value}"} if _API_KEY.value else {}
  models = httpx.get(_URL.value + "/v1/models", headers=headers, timeout=30).json()
  model = models["data"][0]["id"]
  results, elapsed = asyncio.run(run_load(model))
  summary = summarize(results, elapsed)
  with open(_OUT.value, "w") as f:
    json.dump(summary, f, indent=1)
  if _PLOT.value:
    plot(summary, results, _PLOT.value)
  brief = {k: summary[k] for k in ("completed", "failed", "output_tokens_per_s",
                                    "goodput_requests_per_s", "ttft_ms", "tpot_ms", "itl_ms")}
  print(json.dumps(brief, indent=1))
  return 0 if summary["completed"] else 1


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
