"""One place that turns a run config into (ModelConfig, params, Tokenizer).

Sources, in order:
  * `checkpoint`: a flaxstream checkpoint directory (orbax params + tokenizer + config).
  * `model="gemma3_270m"` with no checkpoint: the default cache, converted from the GGUF
    package on first use (progress shown on stderr).
  * `model="tiny"` with no checkpoint: random weights (seeded) and a small SentencePiece
    tokenizer trained on model/data/tiny_corpus.txt: for tests and smoke runs.
"""

from __future__ import annotations

import functools
import pathlib

import jax

from model.config import get_config
from model.tokenizer import Tokenizer, train_tiny_tokenizer

TINY_CORPUS = pathlib.Path(__file__).parent / "data" / "tiny_corpus.txt"


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> Tokenizer:
  return train_tiny_tokenizer(TINY_CORPUS.read_text() * 4, vocab_size=get_config("tiny").vocab_size)


def load_model(model: str = "gemma3_270m", checkpoint: str | None = None, *,
               param_dtype: str | None = None, dtype: str | None = None, quant: str = "none",
               seed: int = 0, shardings=None, progress: bool = True):
  """Returns (ModelConfig, params, Tokenizer).

  `param_dtype` is the weight storage dtype, `dtype` the activation dtype, and
  quant="int8" or "int8_dynamic" quantizes the float weights after loading (model/quantize.py).
  """
  from model import checkpoint as ckpt
  if checkpoint or model == "gemma3_270m":
    path = checkpoint or ckpt.ensure_checkpoint(progress=progress)
    config, params, tok = ckpt.load_checkpoint(path, dtype=param_dtype, shardings=shardings)
  elif model == "tiny":
    from model.transformer import init_params
    config = get_config("tiny", **({"param_dtype": param_dtype} if param_dtype else {}))
    params, tok = init_params(config, jax.random.key(seed)), tiny_tokenizer()
  else:
    raise ValueError(f"unknown model {model!r} without a checkpoint; use gemma3_270m or tiny, "
                     "or pass a checkpoint directory")
  if dtype:
    config = config.replace(dtype=dtype)
  if quant != "none":
    from model.quantize import with_quant
    config, params = with_quant(config, params, quant)
  return config, params, tok
