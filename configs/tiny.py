"""Run config for the tiny test model (random weights unless `checkpoint` is set)."""

from configs import gemma3_270m


def get_config():
  c = gemma3_270m.get_config()
  c.model = "tiny"
  c.engine.max_len = 512
  c.engine.prefill_buckets = (16, 64, 256)
  c.engine.cache_block = 64
  c.max_new_tokens = 64
  return c
