"""Serving config for tests and smoke runs: the tiny model (random weights), 8 slots.

  python -m serving.server --config=configs/serve_tiny.py --port 8000
"""

from configs import tiny


def get_config():
  c = tiny.get_config()
  c.engine.num_slots = 8
  c.engine.top_logprobs = 2  # so the API's logprobs / top_logprobs can be exercised
  return c
