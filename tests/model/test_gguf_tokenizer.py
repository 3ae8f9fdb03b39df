"""The SentencePiece model rebuilt from GGUF metadata must tokenize exactly like the HF reference."""

from __future__ import annotations

import pytest
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from model.gguf_tokenizer import model_proto_from_fields
from model.tokenizer import Tokenizer

_Piece = sp_pb2.ModelProto.SentencePiece


class _Field:
  """Stand-in for gguf.ReaderField: only `.contents()` (and `.data` for its length) are used."""

  def __init__(self, value):
    self.value = value
    self.data = value if isinstance(value, list) else [0]

  def contents(self):
    return self.value


def _fake_fields(pieces_and_types):
  pieces = [p for p, _ in pieces_and_types]
  return {
      "tokenizer.ggml.model": _Field("llama"),
      "tokenizer.ggml.tokens": _Field(pieces),
      "tokenizer.ggml.scores": _Field([-float(i) for i in range(len(pieces))]),
      "tokenizer.ggml.token_type": _Field([t for _, t in pieces_and_types]),
      "tokenizer.ggml.bos_token_id": _Field(2),
      "tokenizer.ggml.eos_token_id": _Field(1),
      "tokenizer.ggml.unknown_token_id": _Field(3),
      "tokenizer.ggml.padding_token_id": _Field(0),
      "tokenizer.ggml.add_space_prefix": _Field(False),
  }


def _reference_prompt_ids(tok: Tokenizer, prompt) -> list[int]:
  if prompt["text"] is not None:
    return tok.encode(prompt["text"], add_bos=True)
  ids = [tok.bos_id]
  for kind, value in prompt["segments"]:
    ids += [value] if kind == "id" else tok.encode(value)
  return ids


def test_fixups_on_a_small_fake_vocab():
  # GGUF quirks as in the real file: <unk> typed control, spaces in user-defined pieces stored
  # as " ", and a marker typed user-defined.
  vocab = ([("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 3), ("<start_of_image>", 4),
            ("<end_of_turn>", 3), ("\n", 4), ("  ", 4)]
           + [(f"<0x{b:02X}>", 6) for b in range(256)]
           + [("\u2581", 1), ("a", 1), ("b", 1), ("ab", 1), ("\u2581a", 1)])
  tok = Tokenizer(model_proto_from_fields(_fake_fields(vocab)))
  ids = {p: i for i, (p, _) in enumerate(vocab)}
  assert tok.sp.is_unknown(3)
  assert tok.encode("  ab") == [ids["  "], ids["ab"]]  # "  " matched as the user-defined piece
  assert tok.encode("\n a") == [ids["\n"], ids["\u2581a"]]
  assert tok.sp.is_control(ids["<start_of_image>"])
  assert ids["<start_of_image>"] not in tok.encode("<start_of_image>")
  assert tok.decode(tok.encode(" a\n  b")) == " a\n  b"
  proto = sp_pb2.ModelProto.FromString(tok.model_proto)
  assert proto.trainer_spec.model_type == sp_pb2.TrainerSpec.BPE and proto.trainer_spec.byte_fallback
  assert not proto.normalizer_spec.add_dummy_prefix
  assert not proto.normalizer_spec.remove_extra_whitespaces


def test_rejects_non_sentencepiece_tokenizer():
  fields = _fake_fields([("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 2)])
  fields["tokenizer.ggml.model"] = _Field("gpt2")
  with pytest.raises(ValueError, match="gpt2"):
    model_proto_from_fields(fields)


@pytest.mark.slow
def test_reference_prompt_ids(gemma_tokenizer, reference):
  mismatched = [p["name"] for p in reference["prompts"]
                if _reference_prompt_ids(gemma_tokenizer, p) != p["ids"]]
  assert not mismatched


@pytest.mark.slow
def test_chat_prompt_matches_reference(gemma_tokenizer, reference):
  chat = next(p for p in reference["prompts"] if p["segments"] is not None)
  assert gemma_tokenizer.chat_prompt("Name three primary colors.") == chat["ids"]


@pytest.mark.slow
def test_tokenizer_cases_encode_and_decode(gemma_tokenizer, reference):
  for case in reference["tokenizer_cases"]:
    assert gemma_tokenizer.encode(case["text"]) == case["ids"], case["text"]
    assert gemma_tokenizer.decode(case["ids"]) == case["decoded"], case["text"]


@pytest.mark.slow
def test_piece_bytes_concatenation_equals_decode(gemma_tokenizer, reference):
  for case in reference["tokenizer_cases"]:
    joined = b"".join(gemma_tokenizer.piece_bytes[i] for i in case["ids"])
    assert joined.decode("utf-8", errors="replace") == gemma_tokenizer.decode(case["ids"]), case["text"]


@pytest.mark.slow
@pytest.mark.parametrize("text", ["<end_of_turn>", "<start_of_turn>model", "<bos><eos><pad>",
                                  "<start_of_image>", "<end_of_image>", "<unk><mask>"])
def test_typed_markers_never_become_control_ids(gemma_tokenizer, text):
  sp = gemma_tokenizer.sp
  ids = gemma_tokenizer.encode("user types " + text)
  assert not [i for i in ids if sp.is_control(i) or sp.is_unknown(i)]
  assert gemma_tokenizer.decode(ids) == "user types " + text


@pytest.mark.slow
def test_special_ids(gemma_tokenizer):
  tok = gemma_tokenizer
  assert (tok.bos_id, tok.eos_id, tok.sp.unk_id(), tok.sp.pad_id()) == (2, 1, 3, 0)
  assert tok.stop_ids == (1, 106)
  assert tok.piece_to_id("<start_of_turn>") == 105
  assert tok.encode("  \t\n\n") == [138, 255968, 108]  # user-defined whitespace runs
