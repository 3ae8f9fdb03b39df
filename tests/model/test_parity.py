"""Parity with an independent float32 implementation (HF transformers) on the same weights."""

import jax
import numpy as np
import pytest

from decode import sampling
from decode.engine import Engine, EngineConfig, Request
from model import native
from tests.model.forward import all_logits

pytestmark = pytest.mark.slow
TOL = 2e-3


@pytest.fixture(scope="module")
def gemma(gemma_gguf):
  config, params, _ = gemma_gguf
  return config, jax.device_put(params)


@pytest.fixture(scope="module", params=[(2, "VD"), (1, "DV"), (1, "packed")],
                ids=["2_slots_VD", "1_slot_DV", "1_slot_packed"])
def engine(gemma, gemma_tokenizer, request):
  """Every layout of the tied embedding: [V,D] as stored, [D,V] (a one-slot engine's on CPU
  without the kernels' float32 rows) and packed (auto's with them): the lookup and the
  head read the table differently in each."""
  config, params = gemma
  slots, layout = request.param
  if layout == "packed" and native.unsupported_here():
    pytest.skip(f"native kernels: {native.unsupported_here()}")
  ec = EngineConfig(num_slots=slots, max_len=768, prefill_buckets=(32, 128, 512),
                    cache_block=256, embedding_layout=layout)
  return Engine(config, params, gemma_tokenizer, ec)


def _check_top(logits, top, label):
  ids = [i for i, _ in top]
  want = np.array([v for _, v in top])
  np.testing.assert_allclose(logits[ids], want, atol=TOL, rtol=0, err_msg=label)
  # Our own top set must be the reference's (up to near-ties at the boundary).
  ours = np.sort(logits)[::-1][:len(top)]
  np.testing.assert_allclose(ours, want, atol=TOL, rtol=0, err_msg=label)


def test_logits_match_reference(reference, gemma):
  config, params = gemma
  for prompt in reference["prompts"]:
    logits = all_logits(config, params, prompt["ids"])
    name = prompt["name"]
    _check_top(logits[-1], prompt["last_top20"], f"{name} last")
    lse = float(jax.nn.logsumexp(logits[-1]))
    assert abs(lse - prompt["last_logsumexp"]) < TOL, (name, lse, prompt["last_logsumexp"])
    for probe in prompt["positions"]:
      _check_top(logits[probe["pos"]], probe["top5"], f"{name} pos {probe['pos']}")
      assert abs(float(jax.nn.logsumexp(logits[probe["pos"]])) - probe["logsumexp"]) < TOL


def test_greedy_continuations_match_reference(reference, engine):
  """Through the real streaming path: bucketed/chunked prefill, pipelined decode steps."""
  eos = tuple(reference["settings"]["eos_ids"])
  assert any(p["n_tokens"] > 512 for p in reference["prompts"])  # crosses the sliding window
  for prompt in reference["prompts"]:
    req = Request(tuple(prompt["ids"]), reference["settings"]["greedy_max_new_tokens"],
                  sampling.make_params(), stop_ids=eos)
    got = [e.token_id for e in engine.submit(req) if e.token_id not in eos]
    want = prompt["greedy_ids"]
    want = [i for i in want if i not in eos]
    # Compare up to the first step where the reference's top-2 gap is within 1e-3.
    n = len(want)
    for step, top5 in enumerate(prompt["greedy_step_top5"]):
      if top5[0][1] - top5[1][1] <= 1e-3:
        n = step
        break
    assert got[:n] == want[:n], prompt["name"]
