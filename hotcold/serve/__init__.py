"""`hotcold serve`: an OpenAI-compatible HTTP server over a Bundle.

    from hotcold.runtime import load
    from hotcold.serve.app import create_app
    app = create_app(load("out/bundle"), name="bundle", max_queue=16)   # a Starlette ASGI app

The runtime decodes one sequence at a time and is not thread-safe, so one worker thread owns the model
and takes requests from a bounded FIFO queue (queue.py); the HTTP side (app.py) validates requests into
the OpenAI shapes (protocol.py), streams text as server-sent events (text.py holds the incremental
decoding and stop strings) and counts what happens for `/metrics` (metrics.py).

Nothing here imports torch, Starlette or uvicorn at import time: `hotcold --help` stays cheap and works
without the `serve` extra installed.
"""
