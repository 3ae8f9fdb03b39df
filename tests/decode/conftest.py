"""Shared fixtures: tiny byte-fallback tokenizers trained once per session."""

from __future__ import annotations

import pytest
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from model.tokenizer import Tokenizer, train_tiny_tokenizer

# Mostly ASCII, with a few characters of each kind so some multi-byte characters get pieces of
# their own. Every other non-ASCII character (most of what the property tests draw) has no
# piece and is spelled as byte-fallback tokens, one per UTF-8 byte.
_CORPUS = "\n".join([
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "café naïve résumé Ärger über Straße señor",
    "中文 日本語 한국어",
    "emoji 😀 👍🏽 👨‍👩‍👧 🇯🇵",
    "combining e\u0301 a\u0308 n\u0303",
] * 10)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Tokenizer:
  """No dummy prefix: decode keeps every space."""
  return train_tiny_tokenizer(_CORPUS, vocab_size=384)


@pytest.fixture(scope="session")
def prefix_tokenizer(tiny_tokenizer) -> Tokenizer:
  """The same vocabulary with a dummy prefix: SentencePiece strips one leading space on decode."""
  proto = sp_pb2.ModelProto.FromString(tiny_tokenizer.model_proto)
  proto.normalizer_spec.add_dummy_prefix = True
  return Tokenizer(proto.SerializeToString())
