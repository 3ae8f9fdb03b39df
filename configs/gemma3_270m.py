"""Run config for Gemma 3 270M: `--config=configs/gemma3_270m.py --config.sampling.temperature=0.7`."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "gemma3_270m"  # preset name (model/config.py)
  c.checkpoint = ""  # "" = default cache dir, converted from the GGUF package on first use
  c.param_dtype = "float32"  # weight storage: float32 | bfloat16
  c.dtype = "float32"  # activations
  c.quant = "none"  # "int8": weight-only int8, per-channel scales; "int8_dynamic": int8 matmuls
  c.seed = 0  # random init seed (tiny model only)

  c.engine = ml_collections.ConfigDict()
  c.engine.num_slots = 1  # concurrent requests (cache rows)
  c.engine.max_len = 4096  # prompt + generated tokens per slot
  c.engine.prefill_buckets = (32, 64, 128, 256, 512)
  c.engine.cache_block = 256
  c.engine.top_logprobs = 0
  # VD | DV | packed | auto (DV for one float32 slot on CPU; for several, packed for the
  # native float32 head on AVX-512, else VD)
  c.engine.embedding_layout = "auto"
  c.engine.native_kernels = "auto"  # on | off | auto (on for one CPU device where they build)

  c.sampling = ml_collections.ConfigDict()
  c.sampling.temperature = 0.0
  c.sampling.top_k = 0
  c.sampling.top_p = 1.0
  c.sampling.min_p = 0.0
  c.sampling.seed = 0

  c.max_new_tokens = 256
  return c
