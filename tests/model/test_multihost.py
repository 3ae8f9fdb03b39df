"""Two processes x 4 CPU devices with jax.distributed on 127.0.0.1 (gloo collectives).

The workers are this file run as a script (`--worker`): each joins the job, puts the tiny
model on a global 2 (data) x 4 (model) mesh -- so slots live on different processes and the
weights are split inside each -- and streams with decode/multihost.generate. Only process 0
has the requests (it broadcasts them) and only it streams; it writes the tokens it got.
They must equal one single-device process. Bounded by a hard timeout; the workers are
killed in `finally` whatever happens.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.model.worker_util import compile_cache_env, load_tiny, save_tiny

NUM_PROCESSES, LOCAL_DEVICES = 2, 4
TIMEOUT_S = 150
REPO = Path(__file__).resolve().parents[2]


def _engine_config():
  from decode.engine import EngineConfig
  # Sharded engines run XLA's code, not the native CPU kernels; the one-process reference too.
  return EngineConfig(num_slots=4, max_len=64, prefill_buckets=(16,), cache_block=8,
                      native_kernels="off")


# Five requests for four slots, so one waits for a slot to be released mid-run.
TEXTS = ["The quick brown fox", "café naïve", "def stream(tokens):", "Pack my box " * 3,
         "emoji 😀 👍🏽"]
SAMPLING = [dict(), dict(temperature=1.0, seed=3), dict(), dict(temperature=0.8, top_k=20, seed=5),
            dict()]


def _requests(tok):
  from decode import sampling
  from decode.engine import Request
  # stop_ids=(): random weights may sample EOS early; the test wants fixed lengths.
  return [Request(tuple(tok.encode(t, add_bos=True)), 6 + i, sampling.make_params(**kw),
                  stop_ids=()) for i, (t, kw) in enumerate(zip(TEXTS, SAMPLING))]


def _tokens_by_request(pairs, n):
  out = [[] for _ in range(n)]
  for i, event in pairs:
    out[i].append(event.token_id)
  return out


def _worker(port: int, process_id: int, out_dir: Path):
  start = time.monotonic()
  log = lambda what: print(f"[{time.monotonic() - start:6.1f}s] {what}", flush=True)
  from decode import multihost
  multihost.initialize(f"127.0.0.1:{port}", NUM_PROCESSES, process_id,
                       local_cpu_devices=LOCAL_DEVICES, timeout_s=60)
  import jax
  from decode.engine import Engine
  from model.sharding import ShardingPlan, get_sharding
  log("joined")
  config, params, tok = load_tiny(out_dir)
  plan = ShardingPlan.create(get_sharding("tensor_data", model=LOCAL_DEVICES))
  engine = Engine(config, params, tok, _engine_config(), plan=plan)
  log("engine placed on the mesh")
  requests = _requests(tok) if process_id == 0 else None  # only process 0 has them
  pairs = list(multihost.generate(engine, requests))
  log(f"generated ({engine.steps_run} decode steps)")
  cache_k = engine.state.cache.layers[0].k
  result = dict(process=jax.process_index(), devices=jax.device_count(),
                local_devices=jax.local_device_count(), mesh=dict(plan.mesh.shape),
                steps_run=engine.steps_run, num_events=len(pairs),
                tokens=_tokens_by_request(pairs, len(TEXTS)),
                cache_fully_addressable=cache_k.is_fully_addressable,
                local_cache_rows=sorted({s.index[0].start or 0 for s in cache_k.addressable_shards}))
  (out_dir / f"process_{process_id}.json").write_text(json.dumps(result))
  jax.distributed.shutdown()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_workers(tmp_path: Path) -> list[dict]:
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", **compile_cache_env())
  env.pop("XLA_FLAGS", None)
  procs, logs = [], []
  try:
    for i in range(NUM_PROCESSES):
      log = open(tmp_path / f"worker_{i}.log", "w")
      logs.append(log)
      procs.append(subprocess.Popen(
          [sys.executable, __file__, "--worker", str(port), str(i), str(tmp_path)],
          cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for log in logs:
      log.close()
  failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
  if failed:
    tails = "\n".join(f"--- worker {i} (exit {rc}) ---\n"
                      + (tmp_path / f"worker_{i}.log").read_text()[-3000:] for i, rc in failed)
    raise AssertionError(f"workers failed or timed out after {TIMEOUT_S}s:\n{tails}")
  return [json.loads((tmp_path / f"process_{i}.json").read_text()) for i in range(NUM_PROCESSES)]


def test_two_processes_stream_the_same_tokens_as_one(tmp_path, tiny_config, tiny_params, tiny_tok):
  from decode import multihost
  from decode.engine import Engine
  save_tiny(tiny_params, tiny_tok, tmp_path)
  results = _run_workers(tmp_path)

  # The reference: this process alone (one device, no mesh), through the same generator.
  requests = _requests(tiny_tok)
  single = Engine(tiny_config, tiny_params, tiny_tok, _engine_config())
  want = _tokens_by_request(multihost.generate(single, requests), len(requests))
  assert [len(w) for w in want] == [r.max_new_tokens for r in requests]

  leader, other = results
  assert leader["devices"] == 8 and leader["local_devices"] == 4
  assert leader["mesh"] == {"data": 2, "model": 4}
  # Slots really are split across the processes: each holds its own half of the cache rows.
  assert not leader["cache_fully_addressable"]
  assert leader["local_cache_rows"] != other["local_cache_rows"]
  assert leader["tokens"] == want
  # Only process 0 streams; both ran the very same number of decode steps (lockstep).
  assert leader["num_events"] == sum(map(len, want)) and other["num_events"] == 0
  assert leader["steps_run"] == other["steps_run"] > 0


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
  _worker(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
