"""The real `openai` client against Gemma 3 270M: the contracts a third-party client relies on.

Greedy (temperature 0) decoding is deterministic, so a streamed answer must equal the
non-streamed one token for token. Requests are short: the model is slow on a shared CPU."""

import openai
import pytest

pytestmark = pytest.mark.slow
MODEL = "gemma-3-270m"
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Write one sentence about the sea."}]


@pytest.fixture(scope="module")
def client(real_server):
  return openai.OpenAI(base_url=real_server.url + "/v1", api_key="unused", max_retries=0,
                       timeout=600)


def _collect(chunks):
  """Joined text and finish reasons per choice index, and the usage chunks, of a stream."""
  texts, finishes, usage = {}, {}, []
  for c in chunks:
    if not c.choices:
      usage.append(c)
    for ch in c.choices:
      piece = ch.text if hasattr(ch, "text") else (ch.delta.content or "")
      texts[ch.index] = texts.get(ch.index, "") + piece
      if ch.finish_reason:
        finishes.setdefault(ch.index, []).append(ch.finish_reason)
  return texts, finishes, usage


def test_stream_equals_non_stream_at_temperature_0(client):
  whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0)
  texts, finishes, usage = _collect(client.chat.completions.create(
      model=MODEL, messages=CHAT, max_tokens=16, temperature=0, stream=True))
  assert texts == {0: whole.choices[0].message.content} and whole.choices[0].message.content
  assert finishes == {0: [whole.choices[0].finish_reason]} and usage == []
  whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0)
  texts, finishes, _ = _collect(client.completions.create(
      model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stream=True))
  assert texts == {0: whole.choices[0].text} and finishes == {0: [whole.choices[0].finish_reason]}


def test_usage_chunk_only_when_asked(client):
  kw = dict(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, stream=True)
  chunks = list(client.completions.create(**kw, stream_options={"include_usage": True}))
  *body, last = chunks
  assert last.choices == [] and last.usage.completion_tokens == 4
  assert last.usage.total_tokens == last.usage.prompt_tokens + 4
  assert all(c.usage is None and c.choices for c in body)
  assert all(c.usage is None and c.choices for c in client.completions.create(**kw))


def test_n2_two_indexed_choices_exactly_one_finish_each(client):
  kw = dict(model=MODEL, messages=CHAT, max_tokens=8, temperature=0.9, seed=5, n=2)
  texts, finishes, usage = _collect(client.chat.completions.create(
      **kw, stream=True, stream_options={"include_usage": True}))
  assert sorted(texts) == [0, 1] and sorted(finishes) == [0, 1]
  assert all(len(f) == 1 and f[0] in ("stop", "length") for f in finishes.values())
  assert len(usage) == 1
  whole = client.chat.completions.create(**kw)
  assert [c.index for c in whole.choices] == [0, 1]
  assert [c.message.content for c in whole.choices] == [texts[0], texts[1]]
  assert usage[0].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_strings(client):
  full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24,
                                   temperature=0).choices[0].text
  word = next(w for w in full.split()[1:] if full.find(w) > 0)  # a word after the start
  cut = full[:full.find(word)]
  for stop in (word, [word, "\u2603never\u2603"]):
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0,
                                      stop=stop)
    assert whole.choices[0].text == cut and whole.choices[0].finish_reason == "stop"
  texts, finishes, _ = _collect(client.completions.create(
      model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=[word], stream=True))
  assert texts == {0: cut} and finishes == {0: ["stop"]}
