"""Session-wide test setup: a persistent XLA compilation cache and the tiny model fixtures."""

import os
import pathlib

import jax
import pytest

# Many tests compile the same small programs; a persistent cache makes reruns cheap.
_CACHE = pathlib.Path(os.environ.get("FLAXSTREAM_TEST_JAX_CACHE",
                                     pathlib.Path(__file__).parent.parent / ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

REPO = pathlib.Path(__file__).resolve().parent.parent
REFERENCE = REPO.parent / "shared" / "reference" / "gemma3_270m_hf.json"

TINY_TEXT = "\n".join([
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "café naïve résumé Ärger über Straße señor 中文 日本語 emoji 😀 👍🏽",
    "def stream(tokens): return [t for t in tokens if t] # END of line",
] * 20)


@pytest.fixture(scope="session")
def tiny_config():
  from model.config import get_config
  return get_config("tiny")


@pytest.fixture(scope="session")
def tiny_params(tiny_config):
  from model.transformer import init_params
  return init_params(tiny_config, jax.random.key(0))


@pytest.fixture(scope="session")
def tiny_tok():
  from model.tokenizer import train_tiny_tokenizer
  return train_tiny_tokenizer(TINY_TEXT, vocab_size=384)
