"""Stream a completion to the terminal.

  python -m decode.generate --config=configs/gemma3_270m.py --prompt="The capital of France"

stdout carries only the generated text, flushed as it streams, so it can be piped; timing
and the finish reason go to stderr. Flags override the config file, which can also be
overridden field by field: --config.sampling.temperature=0.7 --config.engine.max_len=8192.
"""

from __future__ import annotations

import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/gemma3_270m.py", "Run config file.")
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text.", required=True)
_CHAT = flags.DEFINE_bool("chat", False, "Wrap the prompt in the Gemma chat turn template.")
_STOP = flags.DEFINE_multi_string("stop", [], "Stop string (repeatable); never printed.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint directory (overrides config).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate at most.", lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", None, "0 = greedy.", lower_bound=0.0)
_TOP_K = flags.DEFINE_integer("top_k", None, "Keep the k most likely tokens (0 = off).", lower_bound=0)
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus mass in (0, 1] (1 = off).", lower_bound=0.0, upper_bound=1.0)
_MIN_P = flags.DEFINE_float("min_p", None, "Drop tokens below min_p * max prob (0 = off).", lower_bound=0.0, upper_bound=1.0)
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed.")


def apply_flags(config):
  """Flags -> config: every flag given on the command line overrides its config field."""
  with config.unlocked():
    for flag, field in [(_TEMPERATURE, "temperature"), (_TOP_K, "top_k"), (_TOP_P, "top_p"),
                        (_MIN_P, "min_p"), (_SEED, "seed")]:
      if flag.value is not None:
        config.sampling[field] = flag.value
    if _MAX_NEW.value is not None:
      config.max_new_tokens = _MAX_NEW.value
    if _CHECKPOINT.value is not None:
      config.checkpoint = _CHECKPOINT.value
  return config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # stderr is for our report, not orbax/jax INFO lines
    logging.set_verbosity(logging.WARNING)
  config = apply_flags(_CONFIG.value)
  from decode import sampling
  from decode.engine import Request
  try:
    params = sampling.make_params(**config.sampling)
    stop = list(_STOP.value)
    if any(not s for s in stop):
      raise ValueError("--stop strings must be non-empty")
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from decode.build import build_engine
  engine = build_engine(config)
  tok = engine.tokenizer
  ids = tok.chat_prompt(_PROMPT.value) if _CHAT.value else tok.encode(_PROMPT.value, add_bos=True)
  try:
    request = Request(tuple(ids), config.max_new_tokens, params, tuple(stop))
    t = time.perf_counter()
    engine.warmup(prompt_lengths=[len(ids)])
    print(f"[compiled in {time.perf_counter() - t:.1f}s]", file=sys.stderr, flush=True)
    stream = engine.submit(request)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for event in stream:
    if event.text:
      sys.stdout.write(event.text)
      sys.stdout.flush()
  sys.stdout.write("\n")
  sys.stdout.flush()
  total = time.perf_counter() - stream.submitted
  ttft = stream.first_token_time or total
  rate = (stream.num_tokens - 1) / (total - ttft) if stream.num_tokens > 1 and total > ttft else 0.0
  print(f"[ttft {ttft * 1000:.0f} ms | {stream.num_tokens} tokens | {rate:.1f} tokens/s | "
        f"finish_reason={stream.finish_reason}]", file=sys.stderr)
  return 0


def run():
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
