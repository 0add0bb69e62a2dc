"""`portinfer serve`: an OpenAI-compatible HTTP server with continuous batching.

protocol.py (the API's request/response models and error shape), scheduler.py (the engine loop:
slots over one KV cache), app.py (the thin HTTP layer), metrics.py (Prometheus). Needs the
`serve` extra: pip install "portinfer[serve]".
"""
