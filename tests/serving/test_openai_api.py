"""The OpenAI wire format on the tiny model: stream vs non-stream, chunk order, usage, n, stop,
logprobs, extensions. Raw SSE is read with httpx where the framing itself is under test,
and with the `openai` client where a third-party client must work unchanged."""

import re

import httpx
import openai
import pytest

from tests.serving.client import post, stream

PROMPT = "The quick brown fox jumps over"
GREEDY = {"model": "tiny", "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def client(tiny_server):
  return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0)


def test_models_health_and_page_without_cdn(tiny_server):
  models = httpx.get(tiny_server.url + "/v1/models").json()
  assert [m["id"] for m in models["data"]] == ["tiny"] and models["object"] == "list"
  assert httpx.get(tiny_server.url + "/health").json() == {"status": "ok"}
  page = httpx.get(tiny_server.url + "/")
  assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
  assert 'id="stop"' in page.text and "/v1/stream" in page.text
  assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page.text)  # nothing external


def test_completion_stream_equals_non_stream(tiny_server):
  body = {**GREEDY, "prompt": PROMPT, "max_tokens": 24, "logprobs": 2}
  whole = post(tiny_server.url, "/v1/completions", body).json()
  events = stream(tiny_server.url, "/v1/completions", body)
  assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
  chunks = events[:-1]
  assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
  finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
  assert finishes == ["length"] and chunks[-1]["choices"][0]["finish_reason"] == "length"
  choice = whole["choices"][0]
  assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
  assert choice["finish_reason"] == "length" and whole["usage"]["completion_tokens"] == 24
  streamed_lp = [lp for c in chunks if c["choices"][0]["logprobs"]
                 for lp in c["choices"][0]["logprobs"]["token_logprobs"]]
  assert streamed_lp == pytest.approx(choice["logprobs"]["token_logprobs"], abs=1e-5)
  assert len(streamed_lp) == 24


def test_chat_chunks_role_then_content_then_finish(client):
  chunks = list(client.chat.completions.create(
      model="tiny", messages=[{"role": "user", "content": "hello there"}], max_tokens=10,
      temperature=0, stream=True, extra_body={"ignore_eos": True}))
  first, *middle, last = chunks
  assert first.choices[0].delta.role == "assistant" and not first.choices[0].delta.content
  assert all(c.choices[0].delta.role is None for c in middle + [last])
  assert all(c.choices[0].finish_reason is None for c in [first] + middle)
  assert last.choices[0].finish_reason == "length" and not last.choices[0].delta.content
  assert all(c.usage is None for c in chunks)  # no usage unless asked
  whole = client.chat.completions.create(
      model="tiny", messages=[{"role": "user", "content": "hello there"}], max_tokens=10,
      temperature=0, extra_body={"ignore_eos": True})
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
  assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"


def test_usage_chunk_only_when_asked(client, tiny_server):
  kw = dict(model="tiny", prompt=PROMPT, max_tokens=7, temperature=0, stream=True,
            extra_body={"ignore_eos": True})
  with_usage = list(client.completions.create(**kw, stream_options={"include_usage": True}))
  usage = with_usage[-1]
  assert usage.choices == [] and usage.usage.completion_tokens == 7
  assert all(c.usage is None and len(c.choices) == 1 for c in with_usage[:-1])
  prompt_tokens = post(tiny_server.url, "/v1/completions", {**GREEDY, "prompt": PROMPT,
                                                            "max_tokens": 1}).json()["usage"]
  assert usage.usage.prompt_tokens == prompt_tokens["prompt_tokens"]
  assert usage.usage.total_tokens == usage.usage.prompt_tokens + 7
  without = list(client.completions.create(**kw))
  assert all(c.usage is None and len(c.choices) == 1 for c in without)


def test_n2_gives_indexed_choices_seeded_per_choice(client):
  kw = dict(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.0,
            extra_body={"ignore_eos": True})
  chunks = list(client.completions.create(**kw, n=2, seed=11, stream=True))
  texts, finishes = {0: "", 1: ""}, {0: [], 1: []}
  for c in chunks:
    (choice,) = c.choices
    texts[choice.index] += choice.text
    if choice.finish_reason:
      finishes[choice.index].append(choice.finish_reason)
  assert finishes == {0: ["length"], 1: ["length"]}  # exactly one per choice
  # Choice j is sampled with seed + j: each equals a single-choice request with that seed.
  for j in (0, 1):
    solo = client.completions.create(**kw, n=1, seed=11 + j)
    assert solo.choices[0].text == texts[j]
  whole = client.completions.create(**kw, n=2, seed=11)
  assert [c.index for c in whole.choices] == [0, 1]
  assert [c.text for c in whole.choices] == [texts[0], texts[1]]
  assert whole.usage.completion_tokens == 24


def test_stop_strings_string_and_list(tiny_server):
  # Seeded sampling: greedy decoding of random weights repeats one token.
  body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 40, "temperature": 1.0, "seed": 1,
          "ignore_eos": True}
  full = post(tiny_server.url, "/v1/completions", body).json()["choices"][0]["text"]
  # A two-character stop string that first occurs well inside the text.
  at = next(i for i in range(4, len(full) - 2)
            if full.find(full[i:i + 2]) == i and "\ufffd" not in full[i:i + 2])
  stop = full[at:at + 2]
  for stops in (stop, [stop, "never-in-the-output"]):
    whole = post(tiny_server.url, "/v1/completions", {**body, "stop": stops}).json()["choices"][0]
    assert whole["text"] == full[:at] and whole["finish_reason"] == "stop"
    chunks = stream(tiny_server.url, "/v1/completions", {**body, "stop": stops})[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full[:at]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"


def test_logprobs_layouts(tiny_server):
  comp = post(tiny_server.url, "/v1/completions",
              {**GREEDY, "prompt": PROMPT, "max_tokens": 9, "logprobs": 2}).json()["choices"][0]
  lp = comp["logprobs"]
  assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == 9
  assert all(len(top) <= 2 for top in lp["top_logprobs"]) and max(lp["token_logprobs"]) <= 0
  assert lp["text_offset"] == sorted(lp["text_offset"])
  chat = post(tiny_server.url, "/v1/chat/completions",
              {**GREEDY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
               "logprobs": True, "top_logprobs": 2}).json()["choices"][0]
  content = chat["logprobs"]["content"]
  assert len(content) == 6
  for entry in content:  # greedy: the chosen token is the most likely one
    assert len(entry["top_logprobs"]) == 2
    assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-6)
    assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
    assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]
  no_lp = post(tiny_server.url, "/v1/chat/completions",
               {**GREEDY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).json()
  assert no_lp["choices"][0]["logprobs"] is None


def test_top_k_1_equals_greedy_and_min_p_accepted(tiny_server):
  body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 16, "ignore_eos": True}
  greedy = post(tiny_server.url, "/v1/completions", {**body, "temperature": 0}).json()
  top1 = post(tiny_server.url, "/v1/completions",
              {**body, "temperature": 1.5, "top_k": 1, "seed": 3}).json()
  assert top1["choices"][0]["text"] == greedy["choices"][0]["text"]
  r = post(tiny_server.url, "/v1/completions",
           {**body, "temperature": 0.8, "min_p": 0.1, "top_p": 0.9, "seed": 4})
  assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16


def test_chat_uses_gemma_turn_template(tiny_server):
  from model.loading import tiny_tokenizer
  text = "What is the capital of France?"
  r = post(tiny_server.url, "/v1/chat/completions",
           {**GREEDY, "messages": [{"role": "user", "content": text}], "max_tokens": 1}).json()
  assert r["usage"]["prompt_tokens"] == len(tiny_tokenizer().chat_prompt(text))
