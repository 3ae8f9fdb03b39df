"""Sweep config: `python -m decode.sweep --config=configs/sweep.py [--config.x=y]`.

Model and engine fields are those of configs/gemma3_270m.py (so `--config.model=tiny` or
`--config.checkpoint=DIR` work the same way); the sweep adds a prompt file, a grid and an
output directory. Every combination of the grid's values is one setting.
"""

import ml_collections

from configs import gemma3_270m


def get_config() -> ml_collections.ConfigDict:
  c = gemma3_270m.get_config()
  del c.sampling  # the grid below replaces the single sampling setting
  c.engine.num_slots = 4  # requests decoded together
  c.engine.max_len = 256  # prompt + max_new_tokens per request
  c.engine.prefill_buckets = (32, 64, 128)
  c.engine.cache_block = 128

  c.prompts = "configs/sweep_prompts.jsonl"  # JSONL: {"id": ..., "prompt": ...} per line
  c.chat = False  # wrap prompts in the Gemma chat template
  c.stop = ()  # stop strings, for every request
  c.max_new_tokens = 48
  c.output_dir = "/tmp/flaxstream_sweep"  # results.jsonl and summary.jsonl

  c.grid = ml_collections.ConfigDict()
  c.grid.temperature = (0.0, 0.7, 1.0)
  c.grid.top_k = (0,)
  c.grid.top_p = (1.0, 0.9)
  c.grid.min_p = (0.0, 0.1)
  c.grid.seed = (0,)  # several seeds = several samples per prompt and setting
  return c
