"""Session fixtures for the real Gemma 3 270M model: the GGUF is read once per test session.

`gemma_gguf` costs ~20 s (GGUFReader parses 262k tokenizer strings, then every tensor is
dequantized); everything that needs real weights or the real tokenizer shares it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.tokenizer import Tokenizer

REFERENCE_JSON = Path(__file__).parents[3] / "shared" / "reference" / "gemma3_270m_hf.json"


@pytest.fixture(scope="session")
def reference() -> dict:
  """Hugging Face ground truth (see shared/reference/README.md)."""
  if not REFERENCE_JSON.is_file():
    pytest.skip(f"reference outputs not found at {REFERENCE_JSON}")
  return json.loads(REFERENCE_JSON.read_text())


@pytest.fixture(scope="session")
def gguf_path() -> Path:
  """The GGUF, assembled once into the flaxstream cache dir ($FLAXSTREAM_HOME)."""
  from model.gguf_import import default_gguf_path
  return default_gguf_path()


@pytest.fixture(scope="session")
def gemma_gguf(gguf_path):
  """(ModelConfig, float32 numpy param tree, SentencePiece proto bytes) from the GGUF."""
  from model.gguf_import import load_gguf
  return load_gguf(gguf_path, progress=False)


@pytest.fixture(scope="session")
def gemma_tokenizer(gemma_gguf) -> Tokenizer:
  return Tokenizer(gemma_gguf[2])


@pytest.fixture(scope="session")
def gemma_checkpoint_dir(gemma_gguf, tmp_path_factory) -> Path:
  """The GGUF saved as an orbax checkpoint directory (float32) in a session temp dir."""
  from model.checkpoint import save_checkpoint
  config, params, proto = gemma_gguf
  return save_checkpoint(tmp_path_factory.mktemp("gemma_ckpt") / "gemma3_270m", config, params, proto)
