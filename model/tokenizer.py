"""Tokenizer: a thin wrapper over a SentencePiece model, plus the byte table streaming needs.

User text is always encoded as plain text: SentencePiece never produces control pieces
(`<start_of_turn>`, `<end_of_turn>`, `<bos>`, ...) from text, so a user who types
"<end_of_turn>" gets ordinary pieces. Control ids enter a sequence only through code that
places them deliberately (BOS, the chat template).

`piece_bytes` maps every id to the exact bytes it contributes to the decoded text. The
incremental detokenizer (decode/detokenize.py) concatenates those bytes and decodes UTF-8
incrementally, which is what makes split byte-fallback characters safe to stream.
"""

from __future__ import annotations

import re

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
SPACE_MARKER = "\u2581"  # "▁", SentencePiece's visible space.


class Tokenizer:
  """Encode/decode text for a model. Build it from a serialized SentencePiece ModelProto."""

  def __init__(self, model_proto: bytes):
    self.model_proto = model_proto
    self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
    proto = sp_pb2.ModelProto.FromString(model_proto)
    # A dummy prefix means SentencePiece prepends "▁" on encode and strips the first
    # leading space on decode; the detokenizer must strip it the same way.
    self.strips_leading_space = proto.normalizer_spec.add_dummy_prefix
    self.piece_bytes: list[bytes] = [self._bytes_of(i) for i in range(self.sp.get_piece_size())]

  @classmethod
  def from_file(cls, path) -> "Tokenizer":
    with open(path, "rb") as f:
      return cls(f.read())

  def _bytes_of(self, i: int) -> bytes:
    sp = self.sp
    if sp.is_control(i):
      return b""
    if sp.is_unknown(i):
      return sp.decode_ids([i]).encode("utf-8")  # " ⁇ " by default
    piece = sp.id_to_piece(i)
    if sp.is_byte(i):
      return bytes([int(_BYTE_PIECE.match(piece).group(1), 16)])
    return piece.replace(SPACE_MARKER, " ").encode("utf-8")

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  @property
  def bos_id(self) -> int:
    return self.sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self.sp.eos_id()

  def piece_to_id(self, piece: str) -> int:
    """Id of a piece, or -1 when the vocabulary does not have it."""
    i = self.sp.piece_to_id(piece)
    return -1 if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """Ids that end generation: EOS and, for chat models, `<end_of_turn>`."""
    ids = [self.eos_id]
    eot = self.piece_to_id("<end_of_turn>")
    if eot >= 0:
      ids.append(eot)
    return tuple(i for i in ids if i >= 0)

  def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
    """Plain-text encoding; special-token strings in `text` are not parsed."""
    ids = self.sp.encode(text)
    return [self.bos_id] + ids if add_bos else ids

  def decode(self, ids) -> str:
    return self.sp.decode([int(i) for i in ids])

  def chat_prompt(self, user_text: str) -> list[int]:
    """Gemma turn template: <bos><start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n.

    The turn markers are placed as ids; the user's text is encoded as plain text.
    """
    start, end = self.piece_to_id("<start_of_turn>"), self.piece_to_id("<end_of_turn>")
    if start < 0 or end < 0:
      raise ValueError("this tokenizer has no <start_of_turn>/<end_of_turn> pieces; --chat needs them")
    return ([self.bos_id, start] + self.encode("user\n" + user_text) + [end]
            + self.encode("\n") + [start] + self.encode("model\n"))


def train_tiny_tokenizer(text: str, vocab_size: int = 384) -> Tokenizer:
  """Train a small byte-fallback BPE SentencePiece model in memory (for tests and the tiny config)."""
  import io
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(text.splitlines()), model_writer=model, vocab_size=vocab_size,
      model_type="bpe", byte_fallback=True, character_coverage=1.0, add_dummy_prefix=False,
      remove_extra_whitespaces=False, normalization_rule_name="identity",
      user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], bos_id=2, eos_id=1, unk_id=3,
      pad_id=0, minloglevel=2, num_threads=1)
  proto = sp_pb2.ModelProto.FromString(model.getvalue())
  # Turn markers are control pieces in Gemma: never produced from text.
  for p in proto.pieces:
    if p.piece in ("<start_of_turn>", "<end_of_turn>"):
      p.type = sp_pb2.ModelProto.SentencePiece.CONTROL
  return Tokenizer(proto.SerializeToString())
