"""`hotcold serve`: an OpenAI-compatible HTTP server over a Bundle (Starlette + uvicorn, the `serve` extra)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated

import typer

from hotcold.clikit import command, err, escape

# Seconds uvicorn waits on open connections (a stream still generating) after Ctrl-C before cancelling them.
GRACEFUL_SHUTDOWN_S = 5
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0 picks a free one), or one line saying why not."""
    from hotcold.errors import InputError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise InputError(f"--host {host!r} does not resolve ({e.strerror})",
                         "pass an address such as 127.0.0.1 or 0.0.0.0") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(socket.SOMAXCONN)
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror})",
                         "pass another --port (0 picks a free one) or stop what holds it") from None
    sock.set_inheritable(True)
    return sock


def serve_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory written by `hotcold export` or `hotcold compile`.")],
    host: Annotated[str, typer.Option("--host", help="Address to bind. The default answers only this machine; "
                                                     "0.0.0.0 answers the network (set --api-key then).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port; 0 picks a free one (printed).")] = 8000,
    api_key: Annotated[str, typer.Option("--api-key", envvar="HOTCOLD_API_KEY", show_envvar=True,
                                         help="Require 'Authorization: Bearer KEY' on /v1/* and /metrics.")] = "",
    max_queue: Annotated[int, typer.Option("--max-queue", min=1, help="Requests that may wait while one generates; "
                                                                      "one more is answered 429 at once.")] = 16,
    model_name: Annotated[str, typer.Option("--model-name", help="The model id clients pass (default: the bundle "
                                                                 "directory's name).")] = "",
    cold_mode: Annotated[str, typer.Option("--cold-mode", help="How cold neurons are found: exact, threshold or predictor "
                                                     "(as `hotcold run --cold-mode`).")] = "threshold",
    device: Annotated[str, typer.Option("--device", help="Where the GPU side runs: auto (cuda when present), cuda or cpu.")] = "auto",
    gpu_budget: Annotated[str, typer.Option("--gpu-budget", help="Refuse to start if the bundle's GPU part (with the KV "
                                                                 "cache) exceeds this, e.g. 24GiB.")] = "",
    ctx_len: Annotated[int | None, typer.Option("--ctx-len", min=2, help="Context (prompt + completion tokens) to "
                                                                          "serve; default: the model's.")] = None,
    verify: Annotated[str, typer.Option("--verify", help="full (sha256 of every file), size, or none.")] = "full",
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn's log level on stderr: critical, error, "
                                                               "warning, info (one line per request) or debug.")] = "info",
) -> None:
    """Serve a Bundle over an OpenAI-compatible HTTP API (completions and chat, streamed or not).

    GET /v1/models, POST /v1/completions and /v1/chat/completions ("stream": true for server-sent
    events), GET /health, and GET /metrics in Prometheus text.

    One request generates at a time; others wait in a FIFO queue of --max-queue (one more: 429).
    The model id is the bundle directory's name (or --model-name). Greedy answers (temperature 0)
    equal `hotcold run`'s for the same prompt. See docs/serve.md.

    Examples:

      hotcold serve out/bundle --port 8000

      curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "bundle", "max_tokens": 64,
             "messages": [{"role": "user", "content": "Write a function to add two numbers."}]}'

      from openai import OpenAI     # pip install openai
      c = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
      r = c.completions.create(model="bundle", prompt="def fib(n):", max_tokens=32, temperature=0)
    """
    from hotcold.errors import InputError

    levels = ("critical", "error", "warning", "info", "debug")
    if log_level not in levels:
        raise InputError(f"--log-level {log_level!r} is not a log level", f"use one of: {', '.join(levels)}")
    try:
        import uvicorn

        from hotcold.serve.app import create_app
    except ModuleNotFoundError as e:
        raise InputError(f"hotcold serve needs {e.name}, which is not installed",
                         "pip install 'hotcold[serve]'") from None
    from hotcold.runtime import load

    name = model_name or Path(bundle).resolve().name
    kw = {"max_len": ctx_len} if ctx_len else {}
    with err.status(f"loading {escape(str(bundle))} (verify={escape(verify)})"):
        model = load(str(bundle), mode=cold_mode, device=device, gpu_budget=gpu_budget or None, verify=verify, **kw)
    app = create_app(model, name, api_key=api_key or None, max_queue=max_queue)
    sock = listen(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    url = f"http://{shown}:{bound_port}"
    if host not in LOOPBACK and not api_key:
        err.print(f"[bold yellow]warning: listening on {escape(host)} without --api-key: anyone who can reach this "
                  "machine can use the model[/]")
    # The address on stdout (scripts and tests read it: --port 0 picks one), the details on stderr.
    typer.echo(url, err=False)
    err.print(f"serving {escape(name)} ({model.max_len}-token context, cold mode {escape(cold_mode)}) at {url}/v1; queue "
              f"{max_queue}; {'API key required' if api_key else 'no API key'}; Ctrl-C stops")
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                            server_header=False)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn re-raises Ctrl-C after its graceful shutdown; for a server that is the normal way to stop
        if not server.started:
            raise
    finally:
        sock.close()
    if not server.started:
        raise InputError(f"the server at {url} did not start (see uvicorn's messages above)",
                         "re-run with --log-level debug")
    m = app.state.server.metrics
    err.print(f"stopped: {m.completed} generations completed, {m.cancelled} cancelled, "
              f"{m.rejected_queue_full} answered 429")


def register(app: typer.Typer) -> None:
    app.command("serve")(command(serve_cmd))
