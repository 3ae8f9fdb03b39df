"""IncrementalDetokenizer: deltas never split a code point and concatenate to the bulk decode."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decode.detokenize import IncrementalDetokenizer, decode_all

_SETTINGS = settings(max_examples=200, deadline=None)

# Broad Unicode (no surrogates: they cannot be UTF-8), plus the kinds of text that a
# byte-fallback vocabulary splits across several tokens.
_ANY_CHAR = st.characters(codec="utf-8")
_EMOJI = st.one_of(
    st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),
    st.sampled_from(["👨‍👩‍👧", "👍🏽", "🇯🇵", "❤️", "🏳️‍🌈", "🧑🏿‍🚀"]))
_CJK = st.one_of(
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),    # CJK unified: 3 UTF-8 bytes
    st.characters(min_codepoint=0xAC00, max_codepoint=0xD7A3),    # Hangul syllables
    st.characters(min_codepoint=0x20000, max_codepoint=0x2A6DF))  # CJK extension B: 4 bytes
_COMBINING = st.builds(
    lambda base, marks: base + "".join(marks),
    st.sampled_from("aeinouqxyzAEIOU"),
    st.lists(st.characters(min_codepoint=0x300, max_codepoint=0x36F), min_size=1, max_size=3))
_TEXT = st.lists(
    st.one_of(st.text(string.printable, max_size=8), st.text(_ANY_CHAR, max_size=4),
              _EMOJI, _CJK, _COMBINING),
    max_size=12).map("".join)


def _stream(detok: IncrementalDetokenizer, ids, full: str) -> str:
  """Feed ids one at a time and return deltas + flush, checking every delta on the way.

  After each delta the output so far must be a prefix of `full`. A Python str cannot hold part
  of a code point, so a delta could only "split" a character by emitting U+FFFD for its first
  bytes (or a lone surrogate); the prefix check fails on either unless `full` has it there too.
  """
  out = ""
  for i in ids:
    delta = detok.add(i)
    delta.encode("utf-8")  # strict: raises on a lone surrogate
    out += delta
    assert full.startswith(out), (out, full)
  out += detok.flush()
  assert detok.text == out
  return out


def _byte_id(tok, byte: int) -> int:
  return tok.piece_to_id(f"<0x{byte:02X}>")


def test_byte_fallback_emoji_arrives_whole_with_its_last_byte(tiny_tokenizer):
  ids = tiny_tokenizer.encode("🦜")
  assert [tiny_tokenizer.sp.is_byte(i) for i in ids] == [True] * 4
  detok = IncrementalDetokenizer(tiny_tokenizer.piece_bytes)
  assert [detok.add(i) for i in ids] == ["", "", "", "🦜"]
  assert detok.flush() == ""


def test_combining_mark_may_arrive_after_its_base(tiny_tokenizer):
  # Deltas are whole code points, not grapheme clusters: "q" goes out before its mark.
  ids = tiny_tokenizer.encode("q\u0323")
  detok = IncrementalDetokenizer(tiny_tokenizer.piece_bytes)
  deltas = [detok.add(i) for i in ids]
  assert deltas == ["q", "", "\u0323"]


def test_invalid_byte_becomes_replacement_as_soon_as_it_is_known(tiny_tokenizer):
  tok = tiny_tokenizer
  detok = IncrementalDetokenizer(tok.piece_bytes)
  ids = [_byte_id(tok, 0xE4), tok.piece_to_id("a")]
  assert [detok.add(i) for i in ids] == ["", "\ufffda"]
  assert detok.flush() == ""
  assert decode_all(tok.piece_bytes, ids) == "\ufffda"


def test_unfinished_character_at_end_flushes_to_one_replacement(tiny_tokenizer):
  tok = tiny_tokenizer
  ids = [tok.piece_to_id("a"), _byte_id(tok, 0xF0), _byte_id(tok, 0x9F)]
  detok = IncrementalDetokenizer(tok.piece_bytes)
  assert [detok.add(i) for i in ids] == ["a", "", ""]
  assert detok.flush() == "\ufffd"
  assert detok.text == decode_all(tok.piece_bytes, ids) == "a\ufffd"


_TOY = [b"", b" ", b"a", b" b", b"\xe4", b"\xb8\xad"]  # control, space, a, " b", 中 in two pieces


@pytest.mark.parametrize("ids, expected", [
    ([0, 1, 1, 2], " a"),     # a control first does not use up the strip
    ([3, 3], "b b"),          # only the very first space of the output
    ([2, 1, 2], "a a"),       # nothing to strip
    ([4, 5, 1, 2], "中 a"),   # the first character is split across tokens
])
def test_leading_space_is_stripped_once(ids, expected):
  detok = IncrementalDetokenizer(_TOY, strips_leading_space=True)
  assert _stream(detok, ids, expected) == expected
  assert decode_all(_TOY, ids, strips_leading_space=True) == expected
  assert decode_all(_TOY, ids) == b"".join(_TOY[i] for i in ids).decode()


@pytest.mark.parametrize("text", ["hi there", " hi", "  two", "中 文", "🦜 x", ""])
def test_dummy_prefix_matches_sentencepiece(prefix_tokenizer, text):
  tok = prefix_tokenizer
  ids = tok.encode(text, add_bos=True)
  detok = IncrementalDetokenizer(tok.piece_bytes, tok.strips_leading_space)
  assert _stream(detok, ids, tok.decode(ids)) == tok.decode(ids) == text


def test_misuse_is_an_error(tiny_tokenizer):
  detok = IncrementalDetokenizer(tiny_tokenizer.piece_bytes)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    detok.add(-1)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    detok.add(tiny_tokenizer.vocab_size)
  assert detok.flush() == "" and detok.flush() == ""
  with pytest.raises(RuntimeError, match="after flush"):
    detok.add(0)


@_SETTINGS
@given(text=_TEXT, use_prefix=st.booleans(), add_bos=st.booleans())
def test_text_streams_to_sentencepiece_decode(tiny_tokenizer, prefix_tokenizer, text, use_prefix,
                                              add_bos):
  tok = prefix_tokenizer if use_prefix else tiny_tokenizer
  ids = tok.encode(text, add_bos=add_bos)
  expected = tok.decode(ids)  # SentencePiece's own decode is the reference
  detok = IncrementalDetokenizer(tok.piece_bytes, tok.strips_leading_space)
  assert _stream(detok, ids, expected) == expected
  assert decode_all(tok.piece_bytes, ids, tok.strips_leading_space) == expected


@st.composite
def _id_sequences(draw, tok):
  """Random ids, biased towards byte pieces: whole characters, truncated ones, stray bytes."""
  def spell(data: bytes) -> list[int]:
    return [_byte_id(tok, b) for b in data]
  part = st.one_of(
      st.integers(0, tok.vocab_size - 1).map(lambda i: [i]),
      _ANY_CHAR.map(lambda c: spell(c.encode())),
      st.tuples(_ANY_CHAR, st.integers(1, 3)).map(lambda ck: spell(ck[0].encode()[:-ck[1]])),
      st.binary(min_size=1, max_size=4).map(spell))
  return [i for p in draw(st.lists(part, max_size=16)) for i in p]


@_SETTINGS
@given(data=st.data(), strip=st.booleans())
def test_any_ids_stream_to_decode_all(tiny_tokenizer, data, strip):
  tok = tiny_tokenizer
  ids = data.draw(_id_sequences(tok))
  expected = decode_all(tok.piece_bytes, ids, strip)
  detok = IncrementalDetokenizer(tok.piece_bytes, strip)
  assert _stream(detok, ids, expected) == expected
  # SentencePiece agrees whenever the bytes are valid UTF-8 and no control piece interrupts a
  # run of byte pieces (decode/detokenize.py lists where the two differ).
  raw = b"".join(tok.piece_bytes[i] for i in ids)
  if not strip and not any(tok.sp.is_control(i) for i in ids):
    try:
      raw.decode("utf-8")
    except UnicodeDecodeError:
      return
    assert expected == tok.decode(ids)
