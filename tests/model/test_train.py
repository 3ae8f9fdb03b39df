"""model/train.py: the training forward, loss falling, exact resumption, freezing, export."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import train_tiny
from model import train
from model.cache import init_cache
from model.transformer import Transformer, init_params

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A small member of the tiny family: trains ~10 ms/step on 2 CPU cores.
SMALL = dict(vocab_size=384, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
             ffn_dim=192, sliding_window=32, global_every=2, query_pre_attn_scalar=16.0,
             max_context=512)


def _small_cfg(workdir, **changes) -> ml_collections.ConfigDict:
  cfg = train_tiny.get_config()
  cfg.model_overrides = ml_collections.ConfigDict(SMALL)
  cfg.update(dict(seq_len=64, batch_size=8, warmup_steps=10, workdir=str(workdir), log_every=10,
                  eval_every=1000, save_every=1000, eval_batches=1))
  cfg.update(changes)
  return cfg


def _run(args, timeout=300):
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stderr[-3000:]}"
  return proc


def test_training_forward_equals_inference_forward(tiny_config, tiny_params):
  # T=40 crosses the tiny preset's sliding window (8) several times.
  tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, tiny_config.vocab_size)
  model = Transformer(tiny_config)

  @jax.jit
  def inference_logits(params, tokens):
    positions = jnp.broadcast_to(jnp.arange(40), (2, 40))
    h, _ = model.apply({"params": params}, tokens, positions, tokens >= 0,
                       init_cache(tiny_config, 2, 40, block=8), 0)
    return model.apply({"params": params}, h, method=Transformer.logits)

  got = jax.jit(train.forward, static_argnums=0)(tiny_config, tiny_params, tokens)
  np.testing.assert_allclose(got, inference_logits(tiny_params, tokens), atol=1e-4)


def test_batches_depend_only_on_seed_and_step():
  data = train.TextData(np.arange(1000, dtype=np.int32), bos_id=2, vocab_size=1000,
                        eval_fraction=0.1)
  a = data.train_batch(0, 5, 4, 16)
  np.testing.assert_array_equal(a[0], data.train_batch(0, 5, 4, 16)[0])
  assert not np.array_equal(a[0], data.train_batch(0, 6, 4, 16)[0])
  inputs, targets = a
  assert (inputs[:, 0] == 2).all()
  np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])  # shifted by one
  assert targets.max() < 900  # the held-out tail never reaches a training batch


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """300 steps through the absl entry point, with --config.x=y overrides."""
  workdir = tmp_path_factory.mktemp("train") / "run"
  overrides = {**{f"model_overrides.{k}": v for k, v in SMALL.items()},
               "seq_len": 64, "batch_size": 8, "num_steps": 300, "warmup_steps": 30,
               "log_every": 25, "eval_every": 100, "save_every": 100, "eval_batches": 2,
               "workdir": workdir}
  _run(["model.train", "--config=configs/train_tiny.py",
        *[f"--config.{k}={v}" for k, v in overrides.items()]])
  metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return workdir, metrics


def test_few_hundred_steps_fall_well_below_unigram_baseline(trained):
  _, metrics = trained
  first, last = metrics[0], metrics[-1]
  assert last["step"] == 300
  assert last["loss"] < first["loss"] - 0.5
  evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
  assert len(evals) == 3 and evals[-1] < evals[0]
  # Unigram cross-entropy is ~4.1 nats here; a model using context gets far below it.
  assert evals[-1] < 0.8 * last["unigram_loss"]


def test_trained_checkpoint_streams_through_generate_cli(trained):
  from decode.engine import Engine, EngineConfig
  from model.checkpoint import load_checkpoint
  export = trained[0] / "export"
  prompt = "ABSURDITY, n."
  proc = _run(["decode.generate", "--config=configs/tiny.py", f"--checkpoint={export}",
               f"--prompt={prompt}", "--max_new_tokens=16"])
  assert "finish_reason=length" in proc.stderr
  # The CLI streamed exactly the greedy continuation of the exported params.
  config, params, tok = load_checkpoint(export)
  engine = Engine(config, params, tok, EngineConfig(num_slots=1, max_len=64, prefill_buckets=(16,),
                                                   cache_block=16))
  want = engine.generate(prompt, max_new_tokens=16).text()
  assert want.strip() and proc.stdout == want + "\n"


def test_resumed_run_continues_the_same_loss_curve(tmp_path):
  steps = dict(num_steps=30, save_every=10)
  straight = train.train(_small_cfg(tmp_path / "a", **steps), log=lambda _: None)
  resumed_cfg = _small_cfg(tmp_path / "b", **steps)
  before = train.train(resumed_cfg, stop_at=10, log=lambda _: None)
  after = train.train(resumed_cfg, log=lambda _: None)  # a fresh call: restores step 10
  assert sorted(before) == list(range(1, 11)) and sorted(after) == list(range(11, 31))
  np.testing.assert_allclose([after[s] for s in range(11, 31)],
                             [straight[s] for s in range(11, 31)], rtol=1e-6)
  assert (tmp_path / "b" / "export" / "config.json").is_file()


def test_last_layers_fine_tune_freezes_everything_else(tiny_config):
  params = init_params(tiny_config, jax.random.key(0))
  cfg = _small_cfg("/unused", train_last_layers=1, num_steps=20)
  optimizer = train.make_optimizer(cfg, params, tiny_config.num_layers)
  state = {"step": jnp.int32(0), "params": params, "opt_state": optimizer.init(params)}
  tokens = jax.random.randint(jax.random.key(2), (2, 17), 0, tiny_config.vocab_size)
  step = jax.jit(lambda st, x, y: train.train_step(tiny_config, optimizer, st, x, y))
  for _ in range(3):
    state, _ = step(state, tokens[:, :-1], tokens[:, 1:])
  changed = {k: any(bool((a != b).any()) for a, b in zip(jax.tree.leaves(params[k]),
                                                         jax.tree.leaves(state["params"][k])))
             for k in params}
  last = f"layer_{tiny_config.num_layers - 1}"
  assert changed == {k: k in (last, "final_norm") for k in params}
