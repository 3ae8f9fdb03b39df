"""Every bad input gets its status and an OpenAI error body before any stream starts.

The tiny server's context is 512 tokens and its engine returns at most 2 top logprobs."""

import re

import httpx
import pytest

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


def case(path, body, status, param, code, message, content_type="application/json"):
  return pytest.param(path, body, content_type, status, param, code, message,
                      id=f"{status}-{message[:40]}")


CASES = [
    case(COMP, b'{"prompt": "a", ', 400, None, None, r"^the request body is not valid JSON: "),
    case(COMP, b'{"prompt": "a"}', 400, None, None,
         r"^Content-Type must be application/json, got 'text/plain'$", "text/plain"),
    case(COMP, b'["prompt"]', 400, None, None, r"^the request body must be a JSON object, got list$"),
    case(COMP, {"prompt": ""}, 400, "prompt", None, r"^prompt is empty$"),
    case(COMP, {"prompt": []}, 400, "prompt", None, r"^the prompt is empty$"),
    case(COMP, {}, 400, "prompt", "missing_required_parameter", r"^prompt: Field required$"),
    case(CHAT, {"messages": []}, 400, "messages", "invalid_value", r"^messages: List should have at least 1 item"),
    case(CHAT, {"messages": [{"role": "user", "content": ""}]}, 400, "messages", None,
         r"^the prompt is empty: no message has any text$"),
    case(COMP, {"prompt": list(range(10, 20)), "max_tokens": 510}, 400, "prompt",
         "context_length_exceeded",
         r"^This model's maximum context length is 512 tokens\. However, you requested 520 tokens "
         r"\(10 in the prompt, 510 for the completion\)"),
    case(CHAT, {"messages": USER, "max_tokens": 600}, 400, "messages", "context_length_exceeded",
         r"maximum context length is 512 tokens\. However, you requested \d+ tokens \(\d+ in the messages, 600 for"),
    case(COMP, {"prompt": "a", "max_tokens": 0}, 400, "max_tokens", "invalid_value",
         r"^max_tokens: Input should be greater than or equal to 1 \(got 0\)$"),
    case(COMP, {"prompt": "a", "temperature": 2.5}, 400, "temperature", "invalid_value",
         r"^temperature: Input should be less than or equal to 2 \(got 2\.5\)$"),
    case(CHAT, {"messages": USER, "temperature": -0.1}, 400, "temperature", "invalid_value",
         r"^temperature: Input should be greater than or equal to 0 \(got -0\.1\)$"),
    case(COMP, {"prompt": "a", "top_p": 0}, 400, "top_p", "invalid_value",
         r"^top_p: Input should be greater than 0 \(got 0\)$"),
    case(COMP, {"prompt": "a", "top_p": 1.5}, 400, "top_p", "invalid_value",
         r"^top_p: Input should be less than or equal to 1 \(got 1\.5\)$"),
    case(COMP, {"prompt": "a", "top_k": -1}, 400, "top_k", "invalid_value",
         r"^top_k: Input should be greater than or equal to 0 \(got -1\)$"),
    case(CHAT, {"messages": USER, "n": 0}, 400, "n", "invalid_value",
         r"^n: Input should be greater than or equal to 1 \(got 0\)$"),
    case(COMP, {"prompt": "a", "n": 100}, 400, "n", None,
         r"^n=100 x 1 prompt\(s\) = 100 choices exceeds this server's limit of 16$"),
    case(COMP, {"prompt": "a", "stop": ""}, 400, "stop", "invalid_value",
         r"^stop is an empty string; stop strings must be non-empty$"),
    case(CHAT, {"messages": USER, "stop": ["ok", ""]}, 400, "stop", "invalid_value",
         r"^stop\[1\] is an empty string; stop strings must be non-empty$"),
    case(COMP, {"prompt": "a", "logprobs": 5}, 400, "logprobs", None,
         r"^logprobs=5 exceeds this server's limit of 2"),
    case(CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 3}, 400, "top_logprobs", None,
         r"^top_logprobs=3 exceeds this server's limit of 2"),
    case(COMP, {"prompt": [5, 9999]}, 400, "prompt", None,
         r"^prompt has token ids outside \[0, 384\): \[9999\]$"),
    case(COMP, {"prompt": "a", "logit_bias": {"7": 101}}, 400, "logit_bias", None,
         r"^logit_bias value 101(\.0)? for token 7 is outside \[-100, 100\]$"),
    case(COMP, {"prompt": "a", "presence_penalty": 0.5}, 400, "presence_penalty", "invalid_value",
         r"^presence_penalty=0\.5 is not supported \(only 0\)$"),
    case(CHAT, {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role",
         "invalid_value", r"^messages\[0\]\.role: Input should be 'system', 'developer', 'user' or 'assistant' \(got 'robot'\)$"),
    case(COMP, {"prompt": "a", "model": "gpt-4o"}, 404, "model", "model_not_found",
         r"^The model `gpt-4o` does not exist\. This server serves `tiny`\.$"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("path,body,content_type,status,param,code,message", CASES)
def test_bad_input_gets_status_and_error_body(tiny_server, path, body, content_type, status,
                                              param, code, message, stream):
  if isinstance(body, dict):
    body = httpx.Request("POST", "/", json={**body, "stream": stream}).content
  r = httpx.post(tiny_server.url + path, content=body, headers={"content-type": content_type},
                 timeout=30)
  assert r.status_code == status, r.text
  assert r.headers["content-type"] == "application/json"  # not an event stream
  error = r.json()["error"]
  assert set(r.json()) == {"error"} and set(error) == {"message", "type", "param", "code"}
  assert error["type"] == "invalid_request_error"
  assert (error["param"], error["code"]) == (param, code)
  assert re.search(message, error["message"]), error["message"]


def test_unknown_route_and_method_use_the_error_body(tiny_server):
  r = httpx.get(tiny_server.url + "/v1/nothing")
  assert r.status_code == 404 and r.json()["error"]["message"] == "Not Found"
  r = httpx.get(tiny_server.url + COMP)
  assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
