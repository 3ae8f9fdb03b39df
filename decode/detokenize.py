"""Token ids -> text deltas, safe to stream one token at a time.

A byte-fallback tokenizer spells a character it has no piece for as one token per UTF-8 byte,
so "😀" can arrive as four tokens <0xF0> <0x9F> <0x98> <0x80>. Decoding each token on its own
would stream four U+FFFD. Instead we concatenate the tokens' bytes (`Tokenizer.piece_bytes`)
through one incremental UTF-8 decoder: it holds the bytes of an unfinished character and emits
it only once complete, so a delta never contains part of a code point. Each token costs
O(len(piece)), independent of how much text came before.

What a delta is: a run of whole Unicode *code points*, not grapheme clusters. A combining mark
("e" + U+0301) or the rest of an emoji ZWJ sequence may arrive in a later delta than its base
character. That is expected; concatenating the deltas always gives the right text.

Invalid UTF-8 (a model can sample any byte sequence) becomes U+FFFD the way
`bytes.decode("utf-8", "replace")` does it: one U+FFFD per maximal invalid subpart. The
deltas concatenate exactly to `decode_all`. That equals SentencePiece's own decode for
anything `Tokenizer.encode` produces, but a sampler can reach corners where they differ:
  - SentencePiece writes one U+FFFD per invalid byte (b"\\xe4\\xb8" gives two, Python one);
  - it decodes each run of byte pieces on its own, so a control piece (b"") between the bytes
    of one character breaks it, while here the bytes still join up;
  - with a dummy prefix it strips the leading space only from an ordinary piece, not from the
    unknown piece's " ⁇ " or a <0x20> byte piece; here the first space of the output goes.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence


def decode_all(piece_bytes: Sequence[bytes], ids: Iterable[int],
               strips_leading_space: bool = False) -> str:
  """The text of a whole id sequence: what an IncrementalDetokenizer's deltas concatenate to."""
  text = b"".join(piece_bytes[int(i)] for i in ids).decode("utf-8", "replace")
  if strips_leading_space and text.startswith(" "):
    text = text[1:]
  return text


class IncrementalDetokenizer:
  """Turn a stream of token ids into text deltas that never split a code point.

  Usage: call `add(id)` for every sampled token and send each non-empty return value to the
  client, then call `flush()` once when generation ends and send that too.

  Args:
    piece_bytes: the exact bytes each id contributes (`Tokenizer.piece_bytes`).
    strips_leading_space: drop one space at the very start of the output, as SentencePiece
      does for models trained with a dummy prefix (`Tokenizer.strips_leading_space`). Only the
      first character of the whole output is ever stripped, so a space that starts a later
      delta is kept.
  """

  def __init__(self, piece_bytes: Sequence[bytes], strips_leading_space: bool = False):
    self._piece_bytes = piece_bytes
    self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    # True until the first character has been emitted (and stripped if it is a space).
    self._strip_pending = strips_leading_space
    self._parts: list[str] = []
    self._flushed = False

  def add(self, token_id: int) -> str:
    """Consume one token; return the text it completes (may be "" mid-character)."""
    if self._flushed:
      raise RuntimeError("add() after flush(): start a new IncrementalDetokenizer per stream")
    token_id = int(token_id)
    # Guard explicitly: a negative id would otherwise index from the end of the table.
    if not 0 <= token_id < len(self._piece_bytes):
      raise ValueError(
          f"token id {token_id} is outside the vocabulary (size {len(self._piece_bytes)})")
    return self._emit(self._decoder.decode(self._piece_bytes[token_id]))

  def flush(self) -> str:
    """End the stream: release buffered bytes; an unfinished character becomes U+FFFD.

    Calling it again returns "".
    """
    if self._flushed:
      return ""
    self._flushed = True
    return self._emit(self._decoder.decode(b"", final=True))

  @property
  def text(self) -> str:
    """Everything emitted so far (the concatenation of all returned deltas)."""
    # Joined on read, not per token, so add() never copies the text so far.
    joined = "".join(self._parts)
    self._parts = [joined]
    return joined

  def _emit(self, delta: str) -> str:
    if delta and self._strip_pending:
      self._strip_pending = False
      if delta.startswith(" "):
        delta = delta[1:]
    if delta:
      self._parts.append(delta)
    return delta
