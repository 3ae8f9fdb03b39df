"""Serve a model over HTTP:

  python -m serving.server --config=configs/gemma3_270m.py --port 8000
  python -m serving.server --config=configs/serve_tiny.py --config.engine.num_slots=2 --max_queue=4

The config file sets the model and the engine (slots, context, buckets), overridable field by
field (--config.engine.num_slots=8); flags set the server. The API key comes from --api_key
or the FLAXSTREAM_API_KEY environment variable (the variable keeps it out of `ps`).
The port opens only once every program is compiled, so the first request is not slow.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/gemma3_270m.py", "Run config file.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind (0.0.0.0: all interfaces).")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free port).")
_API_KEY = flags.DEFINE_string("api_key", None, "Require 'Authorization: Bearer <key>' on /v1 "
                               "(default: $FLAXSTREAM_API_KEY; unset: no auth).")
flags.DEFINE_alias("api-key", "api_key")  # the spelling other servers (vLLM) use
_MODEL_NAME = flags.DEFINE_string("served_model_name", None, "Model id clients pass as `model` "
                                  "(default: the config's model).")
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 64, "Requests that may wait for a slot; more "
                                  "get 429.", lower_bound=0)
_MAX_UNREAD = flags.DEFINE_integer("max_unread_events", 1024, "Events a client may fall behind "
                                   "before it is dropped.", lower_bound=1)
_SEND_TIMEOUT = flags.DEFINE_float("send_timeout", 30.0, "Seconds one write to a client may "
                                   "block before it is dropped.", lower_bound=0.1)
_KEEPALIVE = flags.DEFINE_float("sse_keepalive", 0.0, "Seconds between SSE ': ping' comments "
                                "(0: off).", lower_bound=0.0)
_MAX_N = flags.DEFINE_integer("max_n", 16, "Choices per request (n).", lower_bound=1)
_PORT_FILE = flags.DEFINE_string("port_file", None, "Write the bound port here once serving "
                                 "(for --port=0).")
_LOG_LEVEL = flags.DEFINE_enum("log_level", "warning", ["debug", "info", "warning", "error"],
                               "uvicorn log level.")


def serve_config(config):
  from serving.config import ServeConfig
  return ServeConfig(
      model_name=_MODEL_NAME.value or config.model, max_queue=_MAX_QUEUE.value,
      max_unread_events=_MAX_UNREAD.value, send_timeout=_SEND_TIMEOUT.value,
      sse_keepalive=_KEEPALIVE.value, max_n=_MAX_N.value,
      default_max_tokens=config.max_new_tokens,
      api_key=_API_KEY.value or os.environ.get("FLAXSTREAM_API_KEY") or None)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import uvicorn

  from decode.build import build_engine
  from serving.api import create_app
  from serving.engine_thread import EngineThread
  from serving.metrics import Metrics

  import prometheus_client
  prometheus_client.disable_created_metrics()  # no *_created series: noise for scrapers
  config = _CONFIG.value
  sc = serve_config(config)
  print(f"[loading {config.model}]", file=sys.stderr, flush=True)
  engine = build_engine(config)
  worker = EngineThread(engine, Metrics(sc.model_name), max_queue=sc.max_queue,
                        max_unread=sc.max_unread_events)
  print("[compiling]", file=sys.stderr, flush=True)
  worker.start()
  server = uvicorn.Server(uvicorn.Config(
      create_app(worker, sc), host=_HOST.value, log_level=_LOG_LEVEL.value,
      timeout_graceful_shutdown=5))
  # Bind here rather than in uvicorn, so the port is known (and reported) even for --port=0;
  # connections made before uvicorn starts accepting wait in the backlog.
  sock = socket.create_server((_HOST.value, _PORT.value), backlog=2048)
  port = sock.getsockname()[1]
  print(f"[serving {sc.model_name} on http://{_HOST.value}:{port}]", file=sys.stderr, flush=True)
  if _PORT_FILE.value:
    tmp = _PORT_FILE.value + ".tmp"
    with open(tmp, "w") as f:
      f.write(str(port))
    os.replace(tmp, _PORT_FILE.value)  # readers never see a half-written file
  try:
    server.run(sockets=[sock])
  finally:
    worker.stop()
  return 0


def run():
  logging.getLogger("absl").setLevel(logging.WARNING)
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
