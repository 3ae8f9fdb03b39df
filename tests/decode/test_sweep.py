"""decode/sweep.py: the grid, the statistics, and a whole sweep on the tiny model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import ml_collections
import pytest

from decode import sweep
from decode.engine import Engine, EngineConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_grid_is_the_product_with_greedy_collapsed():
  grid = ml_collections.ConfigDict(dict(temperature=(0.0, 0.8), top_k=(0, 5), top_p=(1.0,),
                                        min_p=(0.0,), seed=(1, 2)))
  settings = sweep.grid_settings(grid)
  # 1 greedy setting + 2 top_k x 2 seeds at temperature 0.8.
  assert len(settings) == 5
  assert settings[0] == dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0)
  assert {(s["top_k"], s["seed"]) for s in settings[1:]} == {(0, 1), (0, 2), (5, 1), (5, 2)}


def test_statistics_on_hand_made_outputs():
  outputs = [[1, 2, 3, 1, 2, 3, 1], [4, 4]]
  # 1-grams: 9 in all, unique {1,2,3,4}; 2-grams: 6 + 1, unique (1,2) (2,3) (3,1) (4,4).
  assert sweep.distinct_n(outputs, 1) == pytest.approx(4 / 9)
  assert sweep.distinct_n(outputs, 2) == pytest.approx(4 / 7)
  # Only the first output has 4-grams: 4 of them, 3 unique; the second is skipped.
  assert sweep.repetition_rate(outputs) == pytest.approx(1 - 3 / 4)
  assert sweep.repetition_rate([[1, 2]]) == 0.0
  results = [dict(token_ids=o, logprobs=[-1.0] * len(o), finish_reason="length", ttft_s=0.1)
             for o in outputs]
  results[1]["logprobs"] = [-4.0, -4.0]
  s = sweep.summarize(results)
  assert s["mean_logprob"] == pytest.approx((7 * -1.0 + 2 * -4.0) / 9)
  assert s["mean_length"] == 4.5 and s["finish_reasons"] == {"length": 2}


def test_read_prompts_rejects_bad_lines(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_text('{"prompt": "a"}\n\n{"id": "x", "prompt": "b"}\n')
  assert sweep.read_prompts(path) == [{"id": "1", "prompt": "a"}, {"id": "x", "prompt": "b"}]
  path.write_text('{"text": "a"}\n')
  with pytest.raises(ValueError, match="p.jsonl:1"):
    sweep.read_prompts(path)


@pytest.fixture(scope="module")
def engine(tiny_config, tiny_params, tiny_tok):
  return Engine(tiny_config, tiny_params, tiny_tok,
                EngineConfig(num_slots=4, max_len=64, prefill_buckets=(16,), cache_block=16))


def test_run_sweep_uses_slots_concurrently(engine):
  prompts = [{"id": str(i), "prompt": p} for i, p in enumerate(["The quick", "Pack my", "def"])]
  settings = [dict(temperature=0.0), dict(temperature=1.0, seed=3)]
  results = sweep.run_sweep(engine, prompts, settings, max_new_tokens=6)
  assert [(r["setting"], r["prompt_id"]) for r in results] == [
      (s, p) for s in range(2) for p in ("0", "1", "2")]
  # 6 requests of <= 6 tokens each on 4 slots: batched, so far fewer than 36 decode steps.
  assert engine.steps_run < 20
  # Each result equals the same request decoded on its own.
  for r in results:
    alone = engine.generate(r["prompt"], max_new_tokens=6, **settings[r["setting"]])
    assert [e.token_id for e in alone if e.token_id >= 0] == r["token_ids"]


def test_run_sweep_names_a_prompt_that_does_not_fit(engine):
  prompts = [{"id": "ok", "prompt": "The quick"}, {"id": "long", "prompt": "Pack my box " * 30}]
  with pytest.raises(ValueError, match="prompt 'long'.*max_len=64"):
    sweep.run_sweep(engine, prompts, [dict(temperature=0.0)], max_new_tokens=8)
  assert engine.num_waiting == engine.num_active == 0  # nothing was submitted


@pytest.fixture(scope="module")
def cli_sweep(tmp_path_factory):
  out = tmp_path_factory.mktemp("sweep")
  proc = subprocess.run(
      [sys.executable, "-m", "decode.sweep", "--config=configs/sweep.py", "--config.model=tiny",
       f"--config.output_dir={out}", "--config.max_new_tokens=10",
       "--config.grid.temperature=(0.0, 1.0)", "--config.grid.seed=(0, 1)"],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  read = lambda name: [json.loads(line) for line in (out / name).read_text().splitlines()]
  return proc, read("results.jsonl"), read("summary.jsonl")


def test_cli_writes_well_formed_results(cli_sweep):
  _, results, summary = cli_sweep
  prompts = sweep.read_prompts(os.path.join(REPO, "configs", "sweep_prompts.jsonl"))
  # --config.grid overrides applied: greedy + temperature 1.0 x 2 seeds x 2 min_p x 2 top_p.
  assert len(summary) == 1 + 2 * 2 * 2
  assert len(results) == len(summary) * len(prompts)
  for r in results:
    assert set(r) >= {"setting", "sampling", "prompt_id", "prompt", "text", "token_ids",
                      "logprobs", "finish_reason", "ttft_s", "total_s", "decode_tokens_per_s"}
    assert r["finish_reason"] in ("stop", "length")
    assert 1 <= len(r["token_ids"]) == len(r["logprobs"]) == r["num_tokens"] <= 10
    assert all(lp <= 0.0 and math.isfinite(lp) for lp in r["logprobs"])
    assert 0.0 <= r["ttft_s"] <= r["total_s"]
    assert r["sampling"] == summary[r["setting"]]["sampling"]


def test_cli_summary_matches_results(cli_sweep):
  proc, results, summary = cli_sweep
  for row in summary:
    mine = [r for r in results if r["setting"] == row["setting"]]
    want = sweep.summarize(mine)
    for key in ("num_results", "mean_logprob", "distinct_1", "distinct_2", "repetition_rate",
                "mean_length"):
      assert row[key] == pytest.approx(want[key]), key
    assert 0.0 < row["distinct_1"] <= 1.0 and 0.0 <= row["repetition_rate"] < 1.0
  assert "distinct_2" in proc.stdout and len(proc.stdout.strip().splitlines()) == len(summary) + 1
