"""Live servers in subprocesses on 127.0.0.1, and helpers to talk to them.

`tiny_server` (random-weight tiny model, 8 slots) is shared by the whole session; the real
Gemma 3 270M server starts only if a test asks for it (`real_server`), once. Every wait is
bounded: a server that does not come up fails the test with its log.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO = pathlib.Path(__file__).resolve().parents[2]


class Server:
  def __init__(self, *args: str, env: dict | None = None, start_timeout: float = 300.0):
    self.dir = tempfile.TemporaryDirectory(prefix="flaxstream-server-")
    port_file = pathlib.Path(self.dir.name) / "port"
    self.log_path = pathlib.Path(self.dir.name) / "server.log"
    self._log = open(self.log_path, "w")
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "serving.server", "--host=127.0.0.1", "--port=0",
         f"--port_file={port_file}", *args],
        cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})
    deadline = time.monotonic() + start_timeout
    while not port_file.exists():
      self._check_alive(deadline)
      time.sleep(0.1)
    self.url = f"http://127.0.0.1:{port_file.read_text()}"
    while True:  # the socket is bound before uvicorn accepts: wait for a real answer
      self._check_alive(deadline)
      try:
        if httpx.get(self.url + "/health", timeout=2).status_code == 200:
          break
      except httpx.TransportError:
        time.sleep(0.1)

  def _check_alive(self, deadline: float):
    if self.proc.poll() is not None or time.monotonic() > deadline:
      self.stop()
      pytest.fail(f"server did not start (exit {self.proc.returncode}):\n{self.log()}")

  def log(self) -> str:
    return self.log_path.read_text()[-5000:]

  def stop(self):
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGINT)
      try:
        self.proc.wait(15)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait(5)
    self._log.close()

  def metrics(self) -> dict[str, float]:
    """Unlabelled view of /metrics: sample name -> value (summed over label sets)."""
    out: dict[str, float] = {}
    text = httpx.get(self.url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
      for s in family.samples:
        out[s.name] = out.get(s.name, 0.0) + s.value
    return out

  def wait_idle(self, timeout: float = 30.0) -> dict[str, float]:
    """Poll /metrics until nothing runs or waits; returns the last scrape."""
    return wait_for(lambda: _idle(self.metrics()), timeout, "the server to become idle")


def _idle(m):
  busy = (m["flaxstream:num_requests_running"] + m["flaxstream:num_requests_waiting"]
          + m["flaxstream:kv_cache_usage_perc"])
  return m if busy == 0 else None


def wait_for(fn, timeout: float, what: str, interval: float = 0.05):
  """Call fn until it returns something truthy, at most `timeout` seconds."""
  deadline = time.monotonic() + timeout
  while True:
    value = fn()
    if value:
      return value
    if time.monotonic() > deadline:
      raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {value!r}")
    time.sleep(interval)


@pytest.fixture(scope="session")
def tiny_server():
  server = Server("--config=configs/serve_tiny.py")
  yield server
  server.stop()


@pytest.fixture(scope="session")
def real_server():
  # Two slots for n=2; a 1024-token context keeps the compiled programs small.
  server = Server("--config=configs/gemma3_270m.py", "--config.engine.num_slots=2",
                  "--config.engine.max_len=1024", "--config.engine.top_logprobs=2",
                  "--served_model_name=gemma-3-270m", start_timeout=600)
  yield server
  server.stop()
