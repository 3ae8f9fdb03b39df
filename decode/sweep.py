"""Sampling sweeps: a grid of settings over a JSONL prompt file, batched through one Engine.

  python -m decode.sweep --config=configs/sweep.py
  python -m decode.sweep --config=configs/sweep.py --config.grid.temperature='(0.3, 1.0)' \
      --config.max_new_tokens=32 --config.output_dir=/tmp/sweep

Every (setting, prompt) pair is one request. Up to `engine.num_slots` of them run at once in
the slots of one Engine, so the grid decodes batched, and a new request is submitted only
when a slot frees up: its timing therefore starts at admission, not at the back of a queue.

Outputs in `output_dir`:
  results.jsonl  one line per (setting, prompt): setting index and sampling values, prompt id
                 and text, generated text, token_ids, per-token logprobs (the model's own
                 log-probability of each chosen token, before temperature and filters),
                 finish_reason, ttft_s, total_s, decode_tokens_per_s.
  summary.jsonl  one line per setting: the statistics below, also printed as a table.

Statistics, per setting, on generated token ids:
  mean_logprob     mean of the per-token logprobs over all generated tokens;
  distinct_1/2     unique n-grams / all n-grams, pooled over the setting's outputs
                   (n-grams never span two outputs);
  repetition_rate  per output, 1 - unique 4-grams / all 4-grams (how much of the text
                   repeats itself), averaged over outputs long enough to have a 4-gram;
  mean_length      mean number of generated tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import pathlib
import sys
from typing import Sequence

REPETITION_N = 4
# What greedy decoding ignores: settings differing only in these are the same greedy run.
_GREEDY_DEFAULTS = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": 0}
_ORDER = ("temperature", "top_k", "top_p", "min_p", "seed")  # grid order, outermost first


# ---- inputs ------------------------------------------------------------------------------
def grid_settings(grid) -> list[dict]:
  """The cartesian product of the grid's value lists, as sampling kwargs.

  Greedy (temperature 0) ignores top_k, top_p, min_p and the seed, so those combinations
  collapse into one greedy setting instead of decoding the same text several times.
  """
  names = sorted(grid.keys(), key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n))
  settings = []
  for values in itertools.product(*(tuple(grid[n]) for n in names)):
    s = dict(zip(names, values))
    if s.get("temperature", 0.0) == 0.0:
      s = {**s, **{k: v for k, v in _GREEDY_DEFAULTS.items() if k in s}}
    if s not in settings:
      settings.append(s)
  return settings


def read_prompts(path) -> list[dict]:
  """JSONL lines {"prompt": str, "id": optional str}; ids default to the line number."""
  prompts = []
  for n, line in enumerate(pathlib.Path(path).read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      continue
    row = json.loads(line)
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
      raise ValueError(f"{path}:{n}: expected an object with a non-empty \"prompt\" string")
    prompts.append({"id": str(row.get("id", n)), "prompt": row["prompt"]})
  if not prompts:
    raise ValueError(f"{path} holds no prompts")
  return prompts


# ---- statistics --------------------------------------------------------------------------
def _ngrams(ids: Sequence[int], n: int) -> list[tuple]:
  return [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]


def distinct_n(outputs: Sequence[Sequence[int]], n: int) -> float:
  """Unique n-grams over all n-grams, pooled over outputs (0.0 when there are none)."""
  grams = [g for ids in outputs for g in _ngrams(ids, n)]
  return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(outputs: Sequence[Sequence[int]], n: int = REPETITION_N) -> float:
  """Mean over outputs of 1 - unique n-grams / n-grams (outputs shorter than n are skipped)."""
  rates = [1.0 - len(set(g)) / len(g) for g in (_ngrams(ids, n) for ids in outputs) if g]
  return sum(rates) / len(rates) if rates else 0.0


def summarize(results: Sequence[dict]) -> dict:
  """The statistics of one setting's results (see the module docstring)."""
  outputs = [r["token_ids"] for r in results]
  logprobs = [lp for r in results for lp in r["logprobs"]]
  return {
      "num_results": len(results),
      "mean_logprob": sum(logprobs) / len(logprobs) if logprobs else 0.0,
      "distinct_1": distinct_n(outputs, 1),
      "distinct_2": distinct_n(outputs, 2),
      "repetition_rate": repetition_rate(outputs),
      "mean_length": sum(map(len, outputs)) / len(outputs) if outputs else 0.0,
      "finish_reasons": dict(collections.Counter(r["finish_reason"] for r in results)),
      "mean_ttft_s": sum(r["ttft_s"] for r in results) / len(results) if results else 0.0,
  }


# ---- running -----------------------------------------------------------------------------
@dataclasses.dataclass
class _Job:
  setting: int
  prompt: dict
  request: object
  events: list = dataclasses.field(default_factory=list)

  def result(self, sampling: dict) -> dict:
    tokens = [e for e in self.events if e.token_id >= 0]  # error/cancel events carry no token
    last = self.events[-1]
    ttft = tokens[0].time if tokens else last.time
    decode_s = last.time - ttft
    return {
        "setting": self.setting, "sampling": sampling, "prompt_id": self.prompt["id"],
        "prompt": self.prompt["prompt"], "text": "".join(e.text for e in self.events),
        "token_ids": [e.token_id for e in tokens], "logprobs": [e.logprob for e in tokens],
        "finish_reason": last.finish_reason, "num_tokens": len(tokens), "ttft_s": ttft,
        "total_s": last.time,
        "decode_tokens_per_s": (len(tokens) - 1) / decode_s if decode_s > 0 else 0.0,
    }


def run_sweep(engine, prompts: Sequence[dict], settings: Sequence[dict], *, max_new_tokens: int,
              chat: bool = False, stop: Sequence[str] = ()) -> list[dict]:
  """Decode every (setting, prompt) pair, at most `num_slots` at a time. Returns results in
  (setting, prompt) order."""
  from decode import sampling
  from decode.engine import Request, fit_prompt
  tok, ec = engine.tokenizer, engine.engine_config
  encoded = [tok.chat_prompt(p["prompt"]) if chat else tok.encode(p["prompt"], add_bos=True)
             for p in prompts]
  for p, ids in zip(prompts, encoded):  # fail before decoding anything, naming the prompt
    try:
      fit_prompt(ids, max_new_tokens, ec.max_len)
    except ValueError as e:
      raise ValueError(f"prompt {p['id']!r}: {e}") from None
  jobs = [_Job(i, p, Request(tuple(ids), max_new_tokens,
                             sampling.make_params(max_bias=ec.max_bias, **s), tuple(stop)))
          for i, s in enumerate(settings) for p, ids in zip(prompts, encoded)]
  engine.warmup(prompt_lengths=sorted({len(ids) for ids in encoded}))
  waiting, running = collections.deque(jobs), []
  while waiting or running:
    while waiting and len(running) < ec.num_slots:
      job = waiting.popleft()
      running.append((job, engine.submit(job.request, on_event=job.events.append)))
    engine.step()
    running = [(job, stream) for job, stream in running if not stream.done]
  return [job.result(settings[job.setting]) for job in jobs]


def write_outputs(output_dir, settings: Sequence[dict], results: Sequence[dict]) -> list[dict]:
  """Write results.jsonl and summary.jsonl; returns the summary rows."""
  out = pathlib.Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  with open(out / "results.jsonl", "w", encoding="utf-8") as f:
    for r in results:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  summary = [{"setting": i, "sampling": s, **summarize([r for r in results if r["setting"] == i])}
             for i, s in enumerate(settings)]
  with open(out / "summary.jsonl", "w", encoding="utf-8") as f:
    for row in summary:
      f.write(json.dumps(row) + "\n")
  return summary


def format_table(summary: Sequence[dict]) -> str:
  cols = ["mean_logprob", "distinct_1", "distinct_2", "repetition_rate", "mean_length"]
  rows = [["setting"] + cols]
  for s in summary:
    name = " ".join(f"{k}={v}" for k, v in s["sampling"].items())
    rows.append([name] + [f"{s[c]:.3f}" for c in cols])
  widths = [max(len(r[i]) for r in rows) for i in range(len(cols) + 1)]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def run():
  """The absl entry point (flags are defined here, not at import, so tests can import this)."""
  from absl import app, flags, logging
  from ml_collections import config_flags
  config_flag = config_flags.DEFINE_config_file("config", "configs/sweep.py", "Sweep config file.")

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # keep absl INFO lines out of the table
      logging.set_verbosity(logging.WARNING)
    from decode import sampling
    config = config_flag.value
    try:
      prompts = read_prompts(config.prompts)
      settings = grid_settings(config.grid)
      for s in settings:
        sampling.make_params(**s)  # reject bad values before loading the model
    except (OSError, ValueError, TypeError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    from decode.build import build_engine
    engine = build_engine(config)
    print(f"{len(settings)} settings x {len(prompts)} prompts, {config.engine.num_slots} slots",
          file=sys.stderr, flush=True)
    try:
      results = run_sweep(engine, prompts, settings, max_new_tokens=config.max_new_tokens,
                          chat=config.chat, stop=tuple(config.stop))
    except ValueError as e:  # a prompt that does not fit, a chat template the model lacks
      print(f"error: {e}", file=sys.stderr)
      return 2
    summary = write_outputs(config.output_dir, settings, results)
    print(format_table(summary))
    print(f"wrote {config.output_dir}/results.jsonl and summary.jsonl", file=sys.stderr)
    return 0

  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
