"""`smalltalk serve`: the OpenAI-compatible server, split by idea.

  protocol.py  what a request may be: validation, the chat template, errors, incremental detokenising
  metrics.py   the counters and their Prometheus text (summed over `--workers` processes)
  serial.py    the reference engine: one generation at a time behind a lock (HF `generate`)
  batching.py  the default engine: continuous batching per expert, routing batched in the same loop
  remote.py    routing here, generation by OpenAI-compatible servers that hold the experts (vLLM, ...)
  app.py       the FastAPI endpoints over any engine (limits, auth, SSE, cancellation)
  server.py    settings, engine choice, uvicorn; workers.py: `--workers N` processes on one port
"""
