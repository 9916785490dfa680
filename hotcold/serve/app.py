"""The Starlette application: OpenAI's /v1/models, /v1/completions and /v1/chat/completions (with
server-sent-event streaming), /health and /metrics, over one loaded Bundle.

Every failure reaches the client as JSON in OpenAI's error shape with its status code; an unexpected
exception is logged on the server's stderr and answered as a 500 with one line, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from hotcold.serve.metrics import Metrics
from hotcold.serve.protocol import APIError, chunk, parse_generation, parse_json_body, response, sse, usage_chunk
from hotcold.serve.queue import Finished, Job, JobQueue, QueueFull, Worker

# Bodies larger than this are refused unread (413). A prompt that fits the context of any model hotcold
# runs (128k tokens is well under 1 MiB of text) fits many times over.
MAX_BODY_BYTES = 16 * 1024 * 1024
# Seconds a client is told to wait after a 429 (one short generation's time; clients back off from there).
RETRY_AFTER_S = 1
# Paths that answer without the API key: load balancers and orchestrators probe health unauthenticated.
OPEN_PATHS = ("/health",)


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class _CancelOnClose(StreamingResponse):
    """A streaming response that cancels its job however the response ends (finished, client gone, error)."""

    def __init__(self, content: Any, job: Job, **kw: Any):
        super().__init__(content, **kw)
        self.job = job

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 - the ASGI signature
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


class _CountRequests:
    """ASGI middleware: count every HTTP answer by route and status (unknown paths count as "other")."""

    def __init__(self, app: Any, metrics: Metrics, paths: set[str]):
        self.app = app
        self.metrics = metrics
        self.paths = paths

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def counting_send(message) -> None:  # noqa: ANN001
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            path = scope.get("path", "")
            self.metrics.request(path if path in self.paths else "other", status["code"])


class Server:
    """The state behind the routes: the model's worker, its queue, the metrics, the API key."""

    def __init__(self, model: Any, name: str, api_key: str | None = None, max_queue: int = 16):
        if max_queue < 1:
            from hotcold.errors import InputError

            raise InputError(f"--max-queue {max_queue} leaves no room for a request", "pass --max-queue 1 or more")
        self.model = model
        self.name = name
        self.api_key = api_key or None
        self.tokenizer = model.bundle.tokenizer
        self.vocab = int(model.bundle.config.vocab_size)
        self.max_len = int(model.max_len)
        self.created = int(time.time())
        self.metrics = Metrics(name, max_queue)
        self.queue = JobQueue(max_queue)
        self.worker = Worker(model, self.queue, self.metrics)

    # ---- helpers ----------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self.api_key is None or request.url.path in OPEN_PATHS:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if not auth:
            raise APIError(401, "no API key provided; send the header 'Authorization: Bearer KEY' with the key the "
                                "server was started with (--api-key)", code="invalid_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise APIError(401, "incorrect API key provided; send 'Authorization: Bearer KEY' with the server's "
                                "--api-key", code="invalid_api_key")

    async def read_json(self, request: Request) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is {int(length)} bytes; at most {MAX_BODY_BYTES} are accepted",
                           code="request_too_large")
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > MAX_BODY_BYTES:
                raise APIError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes", code="request_too_large")
        if not raw:
            raise APIError(400, "the request body is empty; send a JSON object", code="invalid_json")
        return parse_json_body(bytes(raw))

    def submit(self, req: Any) -> Job:
        if not self.worker.alive():
            raise APIError(503, "the generation worker has stopped; restart the server", type="server_error",
                           code="worker_stopped")
        job = Job(req=req, loop=asyncio.get_running_loop())
        try:
            self.queue.put(job)
        except QueueFull as e:
            self.metrics.queue_full()
            raise APIError(429, f"the server is busy: {e}; retry after {RETRY_AFTER_S} s", type="requests",
                           code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        return job

    def model_card(self) -> dict[str, Any]:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "hotcold",
                "context_length": self.max_len}

    # ---- routes -----------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        ok = self.worker.alive()
        body = {"status": "ok" if ok else "worker stopped", "model": self.name, "queue_depth": len(self.queue),
                "queue_capacity": self.queue.capacity, "running": int(self.worker.current is not None)}
        return JSONResponse(body, status_code=200 if ok else 503)

    async def metrics_text(self, request: Request) -> Response:
        self.authorize(request)
        text = self.metrics.render(len(self.queue), int(self.worker.current is not None))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models(self, request: Request) -> Response:
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model_info(self, request: Request) -> Response:
        self.authorize(request)
        mid = request.path_params["model"]
        if mid != self.name:
            raise APIError(404, f"the model {json.dumps(mid)[:80]} does not exist; this server serves "
                                f"{json.dumps(self.name)}", code="model_not_found", param="model")
        return JSONResponse(self.model_card())

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion")

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def _generate(self, request: Request, kind: str) -> Response:
        self.authorize(request)
        body = await self.read_json(request)
        req = parse_generation(body, kind, self.name, self.tokenizer, self.vocab, self.max_len)
        job = self.submit(req)
        if req.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return _CancelOnClose(self._events(job), job, media_type="text/event-stream", headers=headers)
        try:
            done = await self._wait(job, request)
        finally:
            job.cancel()
        if done is None:  # the client went away: nobody reads this (499, nginx's "client closed request")
            return Response(status_code=499)
        return JSONResponse(response(req, done.text, done.finish_reason, done.completion_tokens))

    async def _wait(self, job: Job, request: Request) -> Finished | None:
        """The job's result, or None if the client disconnects first."""
        result = asyncio.ensure_future(job.events.get())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (result, gone):
                if not t.done():
                    t.cancel()
        if not result.done() or result.cancelled():
            return None
        kind, value = result.result()
        if kind == "error":
            raise value
        return value

    async def _events(self, job: Job):
        req = job.req
        if req.kind == "chat":
            yield sse(chunk(req, "", role=True))
        while True:
            kind, value = await job.events.get()
            if kind == "delta":
                yield sse(chunk(req, value))
            elif kind == "error":
                yield sse(value.body())
                break
            else:
                yield sse(chunk(req, None if req.kind == "chat" else "", finish_reason=value.finish_reason))
                if req.include_usage:
                    yield sse(usage_chunk(req, value.completion_tokens))
                break
        yield sse("[DONE]")


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(model: Any, name: str, api_key: str | None = None, max_queue: int = 16) -> Starlette:
    """The ASGI app serving `model` (a loaded hotcold.runtime model) as `name`. The worker thread starts
    with the app's lifespan and stops (cancelling what waits) when the app shuts down."""
    srv = Server(model, name, api_key=api_key, max_queue=max_queue)

    async def on_api_error(request: Request, exc: Exception) -> Response:
        return error_response(exc)  # type: ignore[arg-type]

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = {404: f"no route {request.method} {request.url.path}; this server serves /v1/models, /v1/completions, "
                    "/v1/chat/completions, /health and /metrics",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error_response(APIError(exc.status_code, msg, code=code))

    async def on_client_gone(request: Request, exc: Exception) -> Response:
        return Response(status_code=499)  # the client left while sending its body: nobody reads this

    async def on_crash(request: Request, exc: Exception) -> Response:
        # Starlette's ServerErrorMiddleware logs the traceback on the server's stderr; the client gets one line.
        return error_response(APIError(500, f"internal error: {type(exc).__name__}; see the server's log",
                                       type="server_error", code="internal_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        srv.worker.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, srv.worker.stop, 30.0)

    routes = [
        Route("/health", srv.health, methods=["GET"]),
        Route("/metrics", srv.metrics_text, methods=["GET"]),
        Route("/v1/models", srv.models, methods=["GET"]),
        Route("/v1/models/{model:path}", srv.model_info, methods=["GET"]),
        Route("/v1/completions", srv.completions, methods=["POST"]),
        Route("/v1/chat/completions", srv.chat_completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={APIError: on_api_error, HTTPException: on_http_error,
                                        ClientDisconnect: on_client_gone, Exception: on_crash})
    app.state.server = srv
    paths = {r.path for r in routes if "{" not in r.path}
    app.add_middleware(_CountRequests, metrics=srv.metrics, paths=paths)
    return app


@contextlib.contextmanager
def background(app: Starlette, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
    """Serve `app` from a thread of this process (a notebook, a test); yields the base URL, e.g.
    http://127.0.0.1:PORT. Leaving the block shuts the server down and stops the worker."""
    import threading

    import uvicorn

    from hotcold.serve.cli import listen

    sock = listen(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, server_header=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="hotcold-serve-http", daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server thread stopped before it started; see its log")
            time.sleep(0.01)
        h, p = sock.getsockname()[:2]
        yield f"http://{h}:{p}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()
