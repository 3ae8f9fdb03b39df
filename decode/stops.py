"""Stop strings over a stream of text deltas.

A stop string can straddle deltas ("EN" then "D"), so text that might be the start of one is
held back until the next delta decides it. The stop string itself, and everything after it, is
never emitted.

Which match wins: the one that starts earliest in the text; among matches starting at the same
place, the longest. The emitted text is therefore `text[:start]` of the earliest occurrence of
any stop string in the whole text, however the text was split into deltas. That sometimes means
waiting after a stop string is already complete, when a longer stop string that would start
earlier is still possible:

  stops ("xay", "a"), deltas "x", "a", ...
    after "xa": "a" is complete at 1, but "xa" may become "xay" at 0 -> emit "", hold "xa"
    next "y":   "xay" at 0 wins -> emit "", stopped
    next "b":   "xay" is impossible, "a" at 1 wins -> emit "x", stopped

A longer stop string that could still complete at the *same* start is not waited for: the
emitted text would be the same, so only `matched` could differ.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
  """Filter a stream of text deltas, ending it at the first stop string.

  Usage: pass every detokenized delta to `feed` and send what it returns; stop generating once
  it reports `stopped`. If generation ends for another reason (EOS, length), call `flush` to
  release the text held back as a possible stop-string prefix.

  Args:
    stop_strings: non-empty strings; duplicates are ignored, and none means nothing is held.
  """

  def __init__(self, stop_strings: Sequence[str]):
    # A bare string would otherwise be read as a sequence of one-character stop strings.
    if isinstance(stop_strings, str):
      raise TypeError(
          f"stop_strings must be a sequence of strings, not the string {stop_strings!r}")
    stops = tuple(dict.fromkeys(stop_strings))
    for s in stops:
      if not isinstance(s, str):
        raise TypeError(f"stop strings must be str, got {type(s).__name__}: {s!r}")
      if not s:
        raise ValueError("stop strings must be non-empty: an empty one matches before any text")
    self._stops = stops
    self._longest = max((len(s) for s in stops), default=0)
    self._pending = ""  # received but not yet emitted
    self._stopped = False
    self._flushed = False
    self.matched: str | None = None  # the stop string that ended the stream, if one did

  @property
  def stopped(self) -> bool:
    return self._stopped

  def feed(self, delta: str) -> tuple[str, bool]:
    """Add a delta; return (text safe to emit now, whether a stop string was found)."""
    if self._stopped:
      return "", True
    if self._flushed:
      raise RuntimeError("feed() after flush(): start a new StopMatcher per stream")
    self._pending += delta
    hold = self._partial_start(self._pending)
    return self._resolve(hold)

  def flush(self) -> str:
    """End of stream: release held-back text (up to a stop string, if one is complete)."""
    if self._stopped or self._flushed:
      return ""
    self._flushed = True
    # Nothing more is coming, so no partial match can complete: hold nothing.
    return self._resolve(len(self._pending))[0]

  def _resolve(self, hold: int) -> tuple[str, bool]:
    """Emit pending[:hold], unless a complete match starts at or before `hold`."""
    pending = self._pending
    match = self._earliest_match(pending)
    if match is not None and match[0] <= hold:
      start, self.matched = match
      self._stopped, self._pending = True, ""
      return pending[:start], True
    self._pending = pending[hold:]
    return pending[:hold], False

  def _earliest_match(self, text: str) -> tuple[int, str] | None:
    """(start, stop string) of the earliest-starting complete match, longest on ties."""
    found = [(i, -len(s), s) for s in self._stops if (i := text.find(s)) >= 0]
    if not found:
      return None
    start, _, stop = min(found)
    return start, stop

  def _partial_start(self, text: str) -> int:
    """Start of the longest suffix of `text` that is a prefix of a stop string.

    len(text) when there is none. Only suffixes shorter than the longest stop string need
    checking (a full-length one would be a complete match, which `_earliest_match` finds), so
    this costs O(max stop length^2 * number of stops), independent of the text length.
    """
    n = len(text)
    for j in range(max(0, n - self._longest + 1), n):
      tail = text[j:]
      if any(s.startswith(tail) for s in self._stops):
        return j
    return n
