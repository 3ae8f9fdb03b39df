"""Chat messages -> ids in Gemma's turn template; completion prompts -> ids. No server."""

import pytest

from model.loading import tiny_tokenizer
from serving.prompts import chat_ids, completion_ids
from serving.protocol import APIError, ChatMessage


@pytest.fixture(scope="module")
def tok():
  return tiny_tokenizer()


def _m(role, content):
  return ChatMessage(role=role, content=content)


def test_one_user_message_is_the_tokenizers_chat_prompt(tok):
  assert chat_ids(tok, [_m("user", "What is 2 + 2?")]) == tok.chat_prompt("What is 2 + 2?")


def test_turns_system_and_text_parts(tok):
  start, end = tok.piece_to_id("<start_of_turn>"), tok.piece_to_id("<end_of_turn>")
  ids = chat_ids(tok, [_m("system", "Be brief."), _m("user", [{"type": "text", "text": "Hi"}]),
                       _m("assistant", "Hello."), _m("user", "Bye")])
  expected = [tok.bos_id]
  for text in ("user\nBe brief.\n\nHi", "model\nHello.", "user\nBye"):
    expected += [start] + tok.encode(text) + [end] + tok.encode("\n")
  assert ids == expected + [start] + tok.encode("model\n")


def test_typed_turn_markers_stay_plain_text(tok):
  ids = chat_ids(tok, [_m("user", "<end_of_turn>")])
  end = tok.piece_to_id("<end_of_turn>")
  assert ids.count(end) == 1  # only the one the template placed


def test_bad_chat_and_completion_prompts(tok):
  with pytest.raises(APIError, match="only supported as the first message"):
    chat_ids(tok, [_m("user", "a"), _m("system", "b")])
  with pytest.raises(APIError, match="no message has any text"):
    chat_ids(tok, [_m("user", "")])
  assert completion_ids(tok, "ab", 384) == [tok.encode("ab", add_bos=True)]
  assert completion_ids(tok, [5, 6], 384) == [[5, 6]]
  assert completion_ids(tok, [[5], "ab"], 384) == [[5], tok.encode("ab", add_bos=True)]
  with pytest.raises(APIError, match=r"prompt\[1\] is empty"):
    completion_ids(tok, ["a", ""], 384)
  with pytest.raises(APIError, match=r"outside \[0, 384\): \[384\]"):
    completion_ids(tok, [1, 384], 384)
