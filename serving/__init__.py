"""flaxstream as a service: an OpenAI-compatible HTTP/WebSocket server over the decode Engine.

  protocol.py       request models, validation, the OpenAI error body
  prompts.py        completion prompts and chat messages (Gemma turn template) -> ids
  plan.py           a validated request -> engine Requests (limits, context, seeds)
  engine_thread.py  the one thread that calls the engine; bounded queues to asyncio
  openai_format.py  engine events -> OpenAI chunks and responses
  service.py / api.py / websocket.py   the FastAPI app; server.py the CLI
  metrics.py        Prometheus metrics; benchmark.py the load generator

Nothing is imported here, so the benchmark client does not pull in JAX.
"""
