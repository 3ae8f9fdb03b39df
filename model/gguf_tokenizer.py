"""Rebuild Gemma 3's SentencePiece ModelProto from the tokenizer tables in a GGUF file.

llama.cpp's converter flattens the SentencePiece model into three parallel arrays
(`tokenizer.ggml.tokens`, `.scores`, `.token_type`) plus a few ids, and drops the trainer and
normalizer specs. Gemma's tokenizer is a byte-fallback BPE model with identity normalization,
no dummy prefix and no whitespace collapsing, so those specs are fully determined and we can
write them back. Three details of the flattened tables need named fix-ups (below).

The result loads with `sentencepiece` (via `model.tokenizer.Tokenizer`) and reproduces the Hugging
Face tokenizer's plain-text ids on every reference prompt and tokenizer case.
"""

from __future__ import annotations

from typing import Any, Mapping

from sentencepiece import sentencepiece_model_pb2 as sp_pb2

_Piece = sp_pb2.ModelProto.SentencePiece

# llama.cpp token_type values (gguf.TokenType) -> SentencePiece piece types.
_GGUF_TYPE_TO_SP = {
    1: _Piece.NORMAL,
    2: _Piece.UNKNOWN,
    3: _Piece.CONTROL,
    4: _Piece.USER_DEFINED,
    5: _Piece.UNUSED,
    6: _Piece.BYTE,
}

# Markers that only code may place in a sequence (turn and image boundaries, specials). A
# USER_DEFINED piece is matched in plain text, so none of these may be one.
MARKER_PIECES = frozenset({
    "<pad>", "<eos>", "<bos>", "<mask>", "<start_of_turn>", "<end_of_turn>",
    "<start_of_image>", "<end_of_image>",
})

SPACE_MARKER = "\u2581"  # "▁"


def _field(fields: Mapping[str, Any], key: str):
  if key not in fields:
    raise ValueError(f"GGUF metadata has no {key!r}; is this a SentencePiece-style (llama) tokenizer?")
  return fields[key].contents()


def escape_user_defined_spaces(piece: str, sp_type: int) -> str:
  """Fix-up: user-defined whitespace pieces ("  ", "   ", ...) come back as plain spaces.

  Why: SentencePiece escapes spaces to "▁" before matching any piece, so a user-defined
  piece spelled with " " can never match and "  " would encode as two "▁" pieces instead
  of id 138. The original model spells them "▁▁"; normal pieces already use "▁" in the GGUF.
  """
  if sp_type == _Piece.USER_DEFINED:
    return piece.replace(" ", SPACE_MARKER)
  return piece


def mark_unknown(sp_types: list[int], unk_id: int) -> None:
  """Fix-up: the GGUF types `<unk>` as control (3), and no piece as unknown (2).

  Why: SentencePiece refuses a model without exactly one UNKNOWN piece, and it must be the
  piece at `unk_id` (the trainer spec's unk_id) for unknown-character handling to agree.
  """
  for i, t in enumerate(sp_types):
    if t == _Piece.UNKNOWN and i != unk_id:
      sp_types[i] = _Piece.CONTROL
  sp_types[unk_id] = _Piece.UNKNOWN


def protect_markers(pieces: list[str], sp_types: list[int]) -> None:
  """Fix-up: marker pieces typed USER_DEFINED in the GGUF become CONTROL.

  Why: SentencePiece matches USER_DEFINED pieces inside plain text, so a user typing
  "<start_of_image>" would inject the marker id. Control pieces are never produced from text;
  the reference (HF with special tokens not parsed) encodes such strings as ordinary pieces.
  In this GGUF the turn markers are already control; the image markers are user-defined.
  """
  for i, (p, t) in enumerate(zip(pieces, sp_types)):
    if p in MARKER_PIECES and t == _Piece.USER_DEFINED:
      sp_types[i] = _Piece.CONTROL


def model_proto_from_fields(fields: Mapping[str, Any]) -> bytes:
  """Serialized SentencePiece ModelProto built from GGUFReader fields (`reader.fields`)."""
  model = _field(fields, "tokenizer.ggml.model")
  if model != "llama":
    raise ValueError(f"tokenizer.ggml.model={model!r}; only SentencePiece ('llama') tokenizers are supported")
  pieces = list(_field(fields, "tokenizer.ggml.tokens"))
  scores = [float(s) for s in _field(fields, "tokenizer.ggml.scores")]
  gguf_types = [int(t) for t in _field(fields, "tokenizer.ggml.token_type")]
  if not len(pieces) == len(scores) == len(gguf_types):
    raise ValueError(f"tokenizer tables disagree in length: tokens={len(pieces)} "
                     f"scores={len(scores)} token_type={len(gguf_types)}")
  unknown = sorted(set(gguf_types) - set(_GGUF_TYPE_TO_SP))
  if unknown:
    raise ValueError(f"unknown tokenizer.ggml.token_type values {unknown}")
  ids = {name: int(_field(fields, f"tokenizer.ggml.{name}_token_id"))
         for name in ("bos", "eos", "unknown", "padding")}
  add_space_prefix = bool(fields["tokenizer.ggml.add_space_prefix"].contents()) if (
      "tokenizer.ggml.add_space_prefix" in fields) else False

  sp_types = [_GGUF_TYPE_TO_SP[t] for t in gguf_types]
  mark_unknown(sp_types, ids["unknown"])
  protect_markers(pieces, sp_types)

  proto = sp_pb2.ModelProto()
  for piece, score, t in zip(pieces, scores, sp_types):
    proto.pieces.add(piece=escape_user_defined_spaces(piece, t), score=score, type=t)

  trainer = proto.trainer_spec
  trainer.model_type = sp_pb2.TrainerSpec.BPE
  trainer.vocab_size = len(pieces)
  trainer.byte_fallback = True
  trainer.unk_id, trainer.bos_id = ids["unknown"], ids["bos"]
  trainer.eos_id, trainer.pad_id = ids["eos"], ids["padding"]
  trainer.unk_piece, trainer.bos_piece = pieces[ids["unknown"]], pieces[ids["bos"]]
  trainer.eos_piece, trainer.pad_piece = pieces[ids["eos"]], pieces[ids["padding"]]

  norm = proto.normalizer_spec
  norm.name = "identity"
  norm.add_dummy_prefix = add_space_prefix
  norm.remove_extra_whitespaces = False
  norm.escape_whitespaces = True
  # Decoding must mirror encoding: no dummy-prefix stripping, identity normalization.
  proto.denormalizer_spec.name = "identity"
  proto.denormalizer_spec.add_dummy_prefix = add_space_prefix
  proto.denormalizer_spec.remove_extra_whitespaces = False
  proto.denormalizer_spec.escape_whitespaces = True
  return proto.SerializeToString()


def model_proto_from_gguf(path) -> bytes:
  """Serialized SentencePiece ModelProto for the tokenizer stored in the GGUF at `path`."""
  import gguf
  return model_proto_from_fields(gguf.GGUFReader(str(path)).fields)
