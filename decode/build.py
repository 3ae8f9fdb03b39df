"""Run config (ml_collections, from configs/*.py) -> a ready Engine.

Shared by every entry point (decode.generate, serving.server, decode.sweep,
decode.benchmark), so config flows one way: flags -> config -> these typed objects.
"""

from __future__ import annotations

import jax

from decode.engine import Engine, EngineConfig


def engine_config(config, **overrides) -> EngineConfig:
  """The `engine` block of a run config as an EngineConfig (lists become tuples)."""
  fields = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in config.engine.items()}
  fields.update(overrides)
  return EngineConfig(**fields)


def use_compilation_cache():
  """Later runs reuse compiled programs from disk instead of recompiling."""
  from model.gguf_import import cache_dir
  jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def load(config, progress: bool = True):
  """(ModelConfig, params, Tokenizer) for a run config; converts the checkpoint on first use."""
  from model.loading import load_model
  return load_model(config.model, config.checkpoint or None, param_dtype=config.param_dtype,
                    dtype=config.dtype, quant=config.get("quant", "none"),
                    seed=config.get("seed", 0), progress=progress)


def build_engine(config, **engine_overrides) -> Engine:
  use_compilation_cache()
  model_config, params, tok = load(config)
  return Engine(model_config, params, tok, engine_config(config, **engine_overrides))
