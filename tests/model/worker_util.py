"""Files that hand the session's tiny model to worker subprocesses.

Workers load the test's params instead of initialising their own: compiling the init again
in every subprocess would cost more than the checks it feeds.
"""

from pathlib import Path

PARAMS_FILE, TOKENIZER_FILE = "params.msgpack", "tokenizer.model"


def save_tiny(params, tok, out_dir: Path):
  import jax
  import numpy as np
  from flax import serialization
  tree = jax.tree.map(np.asarray, params)
  (out_dir / PARAMS_FILE).write_bytes(serialization.msgpack_serialize(tree))
  (out_dir / TOKENIZER_FILE).write_bytes(tok.model_proto)


def load_tiny(out_dir: Path):
  """(ModelConfig, numpy params, Tokenizer) written by save_tiny."""
  from flax import serialization
  from model.config import get_config
  from model.tokenizer import Tokenizer
  params = serialization.msgpack_restore((out_dir / PARAMS_FILE).read_bytes())
  return get_config("tiny"), params, Tokenizer((out_dir / TOKENIZER_FILE).read_bytes())


def compile_cache_env() -> dict:
  """Environment that points a worker at this session's persistent compilation cache."""
  import jax
  cache = jax.config.jax_compilation_cache_dir
  if not cache:
    return {}
  return {"JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS":
          str(jax.config.jax_persistent_cache_min_compile_time_secs)}
