"""Next-token training with optax, resumable orbax checkpoints, and export for decoding.

  python -m model.train --config=configs/train_tiny.py
  python -m model.train --config=configs/train_tiny.py --config.workdir=/tmp/t --config.num_steps=99
  python -m model.train --config=configs/train_tiny.py:gemma_last_layers  # Gemma 3 270M
  python -m decode.generate --config=configs/tiny.py --checkpoint=/tmp/t/export --prompt="LOVE, n."

Data: a text file, tokenized once into one id stream; the last `eval_fraction` is held out.
The batch of step s is a pure function of (seed, s), so a resumed run sees exactly the batches
an uninterrupted run would have, and continues the same loss curve.

Why a separate forward: the inference attention walks the KV cache with a `lax.while_loop`
whose trip count is computed on device, and JAX cannot reverse-differentiate a while loop.
Training has no cache anyway, so `forward` runs the same modules on the same param tree with
plain causal (and sliding-window) attention; tests/model/test_train.py checks that it gives
the inference model's logits.

Workdir layout (everything needed to resume):
  ckpt/<step>/         orbax CheckpointManager: {step, params, opt_state}
  tokenizer.model      the SentencePiece model the ids were made with
  model_config.json    the ModelConfig being trained
  metrics.jsonl        one line every `log_every` steps (and at every eval)
  export/              (default export_dir) a flaxstream checkpoint for decode.generate
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from model.config import ModelConfig, get_config
from model.tokenizer import Tokenizer, train_tiny_tokenizer
from model.transformer import MLP, Embedder, RMSNorm, init_params, rope

DEFAULT_DATA = pathlib.Path(__file__).parent / "data" / "train_corpus.txt"
# `init_checkpoint` value meaning "the default converted Gemma 3 270M checkpoint".
DEFAULT_GEMMA = "gemma3_270m"


# ---- the training forward ----------------------------------------------------------------
def _attention(c: ModelConfig, is_global: bool, p, x, positions):
  """Causal self-attention over the whole sequence, Gemma 3 numerics (see Attention)."""
  b, t, _ = x.shape
  dt, g = x.dtype, c.num_heads // c.num_kv_heads
  norm = RMSNorm(c.rms_eps, c.jnp_param_dtype)
  q = jnp.einsum("BTD,NHD->BTNH", x, p["q"].astype(dt))
  k = jnp.einsum("BTD,KHD->BTKH", x, p["k"].astype(dt))
  v = jnp.einsum("BTD,KHD->BTKH", x, p["v"].astype(dt))
  q = norm.apply({"params": p["q_norm"]}, q)
  k = norm.apply({"params": p["k_norm"]}, k)
  base = c.rope_base_global if is_global else c.rope_base_local
  q = rope(q, positions, base) * jnp.asarray(c.query_pre_attn_scalar ** -0.5, dt)
  k = rope(k, positions, base)
  s = jnp.einsum("BTKGH,BSKH->BKGTS", q.reshape(b, t, c.num_kv_heads, g, -1), k,
                 preferred_element_type=jnp.float32)
  offset = positions[:, :, None] - positions[:, None, :]  # [B,T,S] query minus key position
  ok = offset >= 0
  if not is_global:
    ok &= offset < c.sliding_window
  s = jnp.where(ok[:, None, None], s, -1e30)
  w = jax.nn.softmax(s, axis=-1).astype(dt)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", w, v).reshape(b, t, c.num_heads, -1)
  return jnp.einsum("BTNH,DNH->BTD", out, p["o"].astype(dt))


def forward(config: ModelConfig, params, tokens):
  """Logits [B,T,V] (float32) for tokens [B,T] at positions 0..T-1, without a KV cache."""
  c = config
  norm = lambda p, x: RMSNorm(c.rms_eps, c.jnp_param_dtype).apply({"params": p}, x)
  embedder = Embedder(c)
  x = embedder.apply({"params": params["embedder"]}, tokens, method=Embedder.encode)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  for i, is_global in enumerate(c.is_global):
    p = params[f"layer_{i}"]
    a = _attention(c, is_global, p["attn"], norm(p["pre_attn_norm"], x), positions)
    x = x + norm(p["post_attn_norm"], a)
    m = MLP(c).apply({"params": p["mlp"]}, norm(p["pre_ffw_norm"], x))
    x = x + norm(p["post_ffw_norm"], m)
  h = norm(params["final_norm"], x)
  return embedder.apply({"params": params["embedder"]}, h, method=Embedder.decode)


def loss_fn(config: ModelConfig, params, inputs, targets):
  """Mean next-token cross-entropy in nats."""
  logits = forward(config, params, inputs)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


# ---- data ----------------------------------------------------------------------------------
class TextData:
  """A tokenized text file, split into train and eval id streams, with seeded batches.

  Every training window starts with BOS, as prompts do at decode time: inputs are
  [BOS, w0 .. w_{T-2}] and targets [w0 .. w_{T-1}] for a random window w of the text.
  """

  def __init__(self, ids: np.ndarray, bos_id: int, vocab_size: int, eval_fraction: float):
    n_eval = max(int(len(ids) * eval_fraction), 1)
    self.train_ids, self.eval_ids = ids[:-n_eval], ids[-n_eval:]
    self.bos_id, self.vocab_size = bos_id, vocab_size

  def _windows(self, ids: np.ndarray, starts: np.ndarray, seq_len: int):
    targets = np.stack([ids[s:s + seq_len] for s in starts]).astype(np.int32)
    inputs = np.concatenate([np.full((len(starts), 1), self.bos_id, np.int32), targets[:, :-1]], 1)
    return inputs, targets

  def train_batch(self, seed: int, step: int, batch_size: int, seq_len: int):
    """The batch of `step`: depends on (seed, step) only."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(self.train_ids) - seq_len, size=batch_size)
    return self._windows(self.train_ids, starts, seq_len)

  def eval_batches(self, num_batches: int, batch_size: int, seq_len: int):
    """Fixed, evenly spaced windows of the held-out text."""
    room = len(self.eval_ids) - seq_len
    if room <= 0:
      raise ValueError(f"held-out text has {len(self.eval_ids)} tokens, not more than seq_len; "
                       "raise eval_fraction or lower seq_len")
    starts = np.linspace(0, room, num_batches * batch_size).astype(int)
    return [self._windows(self.eval_ids, s, seq_len) for s in starts.reshape(num_batches, -1)]

  def unigram_loss(self) -> float:
    """Cross-entropy (nats) on the eval ids of unigram frequencies counted on the train ids
    (add-one smoothed): about the best a model that ignores context can do."""
    counts = np.bincount(self.train_ids, minlength=self.vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[self.eval_ids].mean())


# ---- optimizer -----------------------------------------------------------------------------
def lr_schedule(cfg) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then cosine decay to `end_lr_ratio` of it."""
  if not 0 <= cfg.warmup_steps < cfg.num_steps:
    raise ValueError(f"warmup_steps={cfg.warmup_steps} must be in [0, num_steps={cfg.num_steps})")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
      decay_steps=cfg.num_steps, end_value=cfg.learning_rate * cfg.end_lr_ratio)


def trainable_labels(params, train_last_layers: int, num_layers: int):
  """'train' / 'freeze' per leaf. 0 trains everything; N > 0 trains the last N blocks and the
  final norm, freezing the (tied) embedding and every earlier block."""
  if train_last_layers <= 0:
    return jax.tree.map(lambda _: "train", params)
  first = num_layers - train_last_layers
  trained = {f"layer_{i}" for i in range(max(first, 0), num_layers)} | {"final_norm"}
  return {name: jax.tree.map(lambda _, t=name in trained: "train" if t else "freeze", sub)
          for name, sub in params.items()}


def make_optimizer(cfg, params, num_layers: int) -> optax.GradientTransformation:
  """AdamW with linear warmup and cosine decay, global-norm clipping, frozen leaves untouched.

  Clipping sits inside the 'train' branch so the norm covers only trained gradients; frozen
  leaves get `set_to_zero`, which never reads its gradients, so XLA drops their computation.
  Weight decay skips vectors (norm scales): decaying a (1 + scale) gain towards gain 1 is fine,
  but decaying it is not what AdamW's decay is for.
  """
  decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
  train = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                  mask=decay_mask))
  labels = trainable_labels(params, cfg.train_last_layers, num_layers)
  return optax.multi_transform({"train": train, "freeze": optax.set_to_zero()}, labels)


def train_step(config: ModelConfig, optimizer, state: dict, inputs, targets):
  """One AdamW step. state = {step, params, opt_state}; returns (state, metrics)."""
  loss, grads = jax.value_and_grad(functools.partial(loss_fn, config))(
      state["params"], inputs, targets)
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
  return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics


# ---- the run -------------------------------------------------------------------------------
def _same_model_as_workdir(cfg_file: pathlib.Path, config: ModelConfig):
  if cfg_file.is_file() and ModelConfig.from_json(cfg_file.read_text()) != config:
    raise ValueError(f"{cfg_file.parent} holds a run of another model ({cfg_file}); "
                     "resume with the same model settings or use a new workdir")


def _initial_model(cfg, text: str, workdir: pathlib.Path):
  """(ModelConfig, params, Tokenizer) of step 0: fresh, or loaded from `init_checkpoint`.

  The tokenizer and model config are written to the workdir first time, and read back on a
  resume, so a resumed run never re-trains the tokenizer.
  """
  tok_file, cfg_file = workdir / "tokenizer.model", workdir / "model_config.json"
  if cfg.init_checkpoint:
    from model.loading import load_model
    if dict(cfg.model_overrides):
      raise ValueError("model_overrides apply to a model trained from scratch; "
                       "init_checkpoint brings its own model config")
    path = None if cfg.init_checkpoint == DEFAULT_GEMMA else cfg.init_checkpoint
    config, params, tok = load_model(DEFAULT_GEMMA, path, param_dtype="float32")
    config = config.replace(dtype=cfg.dtype)
    _same_model_as_workdir(cfg_file, config)
  else:
    config = get_config(cfg.model, **dict(cfg.model_overrides)).replace(dtype=cfg.dtype)
    _same_model_as_workdir(cfg_file, config)
    tok = (Tokenizer.from_file(tok_file) if tok_file.is_file()
           else train_tiny_tokenizer(text, vocab_size=config.vocab_size))
    if tok.vocab_size != config.vocab_size:
      raise ValueError(f"tokenizer has {tok.vocab_size} pieces; the model has vocab_size="
                       f"{config.vocab_size}")
    params = init_params(config, jax.random.key(cfg.seed))
  if not tok_file.is_file():
    tok_file.write_bytes(tok.model_proto)
    cfg_file.write_text(config.to_json())
  return config, params, tok


def _checkpoint_manager(workdir: pathlib.Path, cfg):
  import orbax.checkpoint as ocp
  return ocp.CheckpointManager(
      workdir / "ckpt",
      options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True))


def export(workdir, export_dir=None, *, step: int | None = None) -> pathlib.Path:
  """Write the latest (or given) training checkpoint of `workdir` as a flaxstream checkpoint
  directory that `load_model` / `decode.generate --checkpoint=DIR` read."""
  import orbax.checkpoint as ocp
  from model.checkpoint import save_checkpoint
  workdir = pathlib.Path(workdir).resolve()
  config = ModelConfig.from_json((workdir / "model_config.json").read_text())
  proto = (workdir / "tokenizer.model").read_bytes()
  with ocp.CheckpointManager(workdir / "ckpt") as mgr:
    step = mgr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no training checkpoint under {workdir / 'ckpt'}")
    # Decoding needs only the params; the optimizer state is restored with them and dropped.
    state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), state["params"])
  target = pathlib.Path(export_dir) if export_dir else workdir / "export"
  return save_checkpoint(target, config.replace(param_dtype="float32", dtype="float32"), params,
                         proto, overwrite=True)


def train(cfg, *, stop_at: int | None = None, log=print) -> dict[int, float]:
  """Train (or resume training) as `cfg` says. Returns {step: training loss} of the steps run.

  stop_at: leave after that step (saving a checkpoint there), as if preempted; a later call
  with the same cfg resumes from it. The learning-rate schedule still spans cfg.num_steps.
  Exports to cfg.export_dir (default workdir/export) when cfg.num_steps is reached.
  """
  import orbax.checkpoint as ocp
  workdir = pathlib.Path(cfg.workdir).resolve()
  workdir.mkdir(parents=True, exist_ok=True)
  text = pathlib.Path(cfg.data or DEFAULT_DATA).read_text(encoding="utf-8")
  config, params, tok = _initial_model(cfg, text, workdir)
  data = TextData(np.asarray(tok.encode(text), np.int32), tok.bos_id, config.vocab_size,
                  cfg.eval_fraction)
  optimizer = make_optimizer(cfg, params, config.num_layers)
  state = {"step": jnp.int32(0), "params": params, "opt_state": optimizer.init(params)}
  mgr = _checkpoint_manager(workdir, cfg)
  start = mgr.latest_step() or 0
  if start:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restore = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    state = mgr.restore(start, args=restore)["state"]
    log(f"resumed from step {start} in {workdir / 'ckpt'}")
  else:
    n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    log(f"model: {n_train:,} params, {config.num_layers} layers, vocab {config.vocab_size}; "
        f"data: {len(data.train_ids):,} train / {len(data.eval_ids):,} eval tokens")
  unigram = data.unigram_loss()
  log(f"unigram baseline (eval): {unigram:.3f} nats")

  step_fn = jax.jit(functools.partial(train_step, config, optimizer), donate_argnums=0)
  eval_fn = jax.jit(functools.partial(loss_fn, config))
  schedule = lr_schedule(cfg)
  evals = data.eval_batches(cfg.eval_batches, cfg.batch_size, cfg.seq_len)
  last = min(cfg.num_steps, stop_at or cfg.num_steps)
  losses: dict[int, float] = {}
  metrics_file = open(workdir / "metrics.jsonl", "a")
  t0, pending = time.perf_counter(), []
  if start >= last:
    log(f"nothing to do: the checkpoint is at step {start}, the run ends at step {last}")
  try:
    for step in range(start, last):
      inputs, targets = data.train_batch(cfg.seed, step, cfg.batch_size, cfg.seq_len)
      state, m = step_fn(state, inputs, targets)
      done = step + 1
      pending.append((done, m))
      is_eval = done % cfg.eval_every == 0 or done == last
      if done % cfg.log_every == 0 or is_eval:
        # One device->host copy per log interval keeps the device ahead of the host.
        for s, mm in jax.device_get(pending):
          losses[s] = float(mm["loss"])
        seconds = time.perf_counter() - t0
        record = {"step": done, "loss": losses[done],
                  "grad_norm": float(pending[-1][1]["grad_norm"]), "lr": float(schedule(step)),
                  "unigram_loss": unigram,
                  "tokens_per_s": len(pending) * cfg.batch_size * cfg.seq_len / seconds}
        if is_eval:
          record["eval_loss"] = float(np.mean([eval_fn(state["params"], *b) for b in evals]))
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in record.items()))
        t0, pending = time.perf_counter(), []
      if done % cfg.save_every == 0 or done == last:
        mgr.save(done, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
  finally:
    metrics_file.close()
    mgr.wait_until_finished()
    mgr.close()
  if last == cfg.num_steps and start < last:
    path = export(workdir, cfg.export_dir or None)
    log(f"exported to {path}")
  return losses


def run():
  """The absl entry point (flags are defined here, not at import, so tests can import this)."""
  from absl import app, flags, logging
  from ml_collections import config_flags
  config = config_flags.DEFINE_config_file("config", "configs/train_tiny.py", "Training config.")
  export_only = flags.DEFINE_bool(
      "export_only", False, "Only export the latest checkpoint of config.workdir, then exit.")
  stop_at = flags.DEFINE_integer(
      "stop_at", None, "Leave after this step (checkpointed); rerun to resume.", lower_bound=1)

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every file it writes at INFO
      logging.set_verbosity(logging.WARNING)
    cfg = config.value
    try:
      if export_only.value:
        print(export(cfg.workdir, cfg.export_dir or None))
      else:
        train(cfg, stop_at=stop_at.value, log=lambda s: print(s, flush=True))
    except (ValueError, FileNotFoundError) as e:  # bad settings: a message, not a traceback
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(main)


if __name__ == "__main__":
  run()
