"""StopMatcher: stop strings across delta boundaries are never emitted, nor anything after them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decode.detokenize import IncrementalDetokenizer
from decode.stops import StopMatcher

_SETTINGS = settings(max_examples=200, deadline=None)


def _run(stops, deltas) -> tuple[str, bool]:
  """Feed every delta, then flush if no stop was hit; return (emitted text, stopped).

  A stop can still be found by the flush: a complete match held back while waiting for a
  longer, earlier-starting stop string that the stream never completed.
  """
  matcher = StopMatcher(stops)
  out = ""
  for d in deltas:
    emitted, stopped = matcher.feed(d)
    out += emitted
    if stopped:
      return out, True
  out += matcher.flush()
  return out, matcher.stopped


def test_stop_split_across_deltas_is_detected_and_not_emitted():
  m = StopMatcher(["END"])
  assert m.feed("the EN") == ("the ", False)
  assert m.feed("D and more") == ("", True)
  assert m.stopped and m.matched == "END"
  assert m.feed("later") == ("", True)
  assert m.flush() == ""


def test_held_back_prefix_is_released_when_the_match_fails():
  m = StopMatcher(["END"])
  assert m.feed("an E") == ("an ", False)
  assert m.feed("N") == ("", False)
  assert m.feed("T") == ("ENT", False)
  assert m.feed("ENEND") == ("EN", True)


def test_stop_at_the_very_start():
  assert _run(["<|end|>"], ["<|", "end|>", "x"]) == ("", True)
  assert _run(["ab"], ["ab"]) == ("", True)


def test_flush_releases_held_text():
  m = StopMatcher(["STOP"])
  assert m.feed("hello ST") == ("hello ", False)
  assert m.flush() == "ST"
  assert m.flush() == "" and not m.stopped
  with pytest.raises(RuntimeError, match="after flush"):
    m.feed("x")


def test_earliest_starting_stop_wins_and_ties_go_to_the_longest():
  assert _run(["world", "o w"], ["hello world"]) == ("hell", True)
  m = StopMatcher(["ab", "abc", "b"])
  assert m.feed("xabcd") == ("x", True) and m.matched == "abc"


def test_waits_for_a_longer_stop_that_would_start_earlier():
  # "a" is complete, but "xa" may still become "xay", which starts earlier.
  m = StopMatcher(["xay", "a"])
  assert m.feed("x") == ("", False)
  assert m.feed("a") == ("", False)
  assert m.feed("y") == ("", True) and m.matched == "xay"
  m = StopMatcher(["xay", "a"])
  assert m.feed("xa") == ("", False)
  assert m.feed("b") == ("x", True) and m.matched == "a"
  # At end of stream the complete match is taken.
  m = StopMatcher(["xay", "a"])
  assert m.feed("xa") == ("", False)
  assert m.flush() == "x" and m.stopped and m.matched == "a"


def test_no_stop_strings_passes_everything_through():
  assert StopMatcher([]).feed("anything") == ("anything", False)


def test_invalid_stop_strings():
  with pytest.raises(ValueError, match="non-empty"):
    StopMatcher(["ok", ""])
  with pytest.raises(TypeError, match="sequence of strings"):
    StopMatcher("END")


def test_stop_inside_a_byte_fallback_character(tiny_tokenizer):
  # The stop string is one CJK character that arrives as three byte-piece tokens.
  tok = tiny_tokenizer
  ids = tok.encode("ok 丈 no")
  assert sum(tok.sp.is_byte(i) for i in ids) == 3
  detok, matcher, out = IncrementalDetokenizer(tok.piece_bytes), StopMatcher(["丈"]), ""
  for i in ids:
    emitted, stopped = matcher.feed(detok.add(i))
    out += emitted
    if stopped:
      break
  assert stopped and out == "ok "


# Small alphabets make matches, partial matches and overlaps common.
_TEXT = st.text("abc\u00e9\u4e2d", max_size=30)
_STOP = st.text("abc\u00e9\u4e2d", min_size=1, max_size=4)


@st.composite
def _split(draw, text: str) -> list[str]:
  """`text` cut at random points, empty deltas included."""
  cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=10)))
  bounds = [0, *cuts, len(text)]
  return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@_SETTINGS
@given(data=st.data(), text=_TEXT, stop=_STOP)
def test_emits_exactly_the_text_before_the_stop(data, text, stop):
  deltas = data.draw(_split(text))
  out, stopped = _run([stop], deltas)
  if stop in text:
    assert stopped and out == text[:text.find(stop)]
  else:
    assert not stopped and out == text


@_SETTINGS
@given(data=st.data(), text=_TEXT, stops=st.lists(_STOP, min_size=1, max_size=4))
def test_several_stops_cut_at_the_earliest_start_however_split(data, text, stops):
  deltas = data.draw(_split(text))
  starts = [text.find(s) for s in stops if s in text]
  out, stopped = _run(stops, deltas)
  assert stopped == bool(starts)
  assert out == (text[:min(starts)] if starts else text)
