"""The streaming CLI, end to end in a subprocess."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REFERENCE


def _run(args, env=None, timeout=600):
  return subprocess.run([sys.executable, "-m", "decode.generate", *args], capture_output=True,
                        text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_first_run_converts_then_streams_reference_greedy_text(tmp_path):
  """A fresh FLAXSTREAM_HOME: the CLI assembles the GGUF, converts it (progress on stderr),
  and at temperature 0 streams exactly the reference's greedy continuation on stdout."""
  ref = json.loads(REFERENCE.read_text())
  prompt = next(p for p in ref["prompts"] if p["name"] == "english")
  proc = _run([f"--prompt={prompt['text']}", "--config=configs/gemma3_270m.py",
               "--temperature=0", f"--max_new_tokens={ref['settings']['greedy_max_new_tokens']}"],
              env={"FLAXSTREAM_HOME": str(tmp_path)})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout == prompt["greedy_text"] + "\n"
  assert "converting" in proc.stderr and "%" in proc.stderr  # progress was shown
  assert "ttft" in proc.stderr and "tokens/s" in proc.stderr and "finish_reason=" in proc.stderr
  assert (tmp_path / "checkpoints" / "gemma3_270m-v2" / "config.json").is_file()


def test_tiny_streams_and_reports_on_stderr():
  proc = _run(["--config=configs/tiny.py", "--prompt=The quick brown", "--max_new_tokens=5",
               "--temperature=0.7", "--seed=1", "--config.sampling.top_k=20"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.endswith("\n") and "finish_reason=length" in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--temperature=-1"], "temperature"),
    (["--top_p=1.5"], "top_p"),
    (["--max_new_tokens=0"], "max_new_tokens"),
    (["--stop="], "--stop strings must be non-empty"),
    (["--bogus_flag=1"], "bogus_flag"),
    (["--max_new_tokens=600"], "exceeds the context max_len=512"),
])
def test_bad_flags_and_too_long_prompts_give_clear_messages(args, message):
  proc = _run(["--config=configs/tiny.py", "--prompt=hello", *args], timeout=300)
  assert proc.returncode != 0
  assert message in proc.stderr
  assert "Traceback" not in proc.stderr
  assert proc.stdout == ""
