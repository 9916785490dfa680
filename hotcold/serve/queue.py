"""One worker thread owns the model; requests wait in a bounded FIFO queue.

The runtime decodes one sequence at a time and is not thread-safe, so every generation runs on the
worker thread, in arrival order. `JobQueue.put` refuses at once when `capacity` requests are already
waiting (the server answers 429). A job cancelled while waiting leaves the queue at once; a job cancelled
while generating stops at its next token (the runtime's on_token callback checks the flag), so a client
that goes away frees its slot within one token.

Results travel back to the asyncio side through `loop.call_soon_threadsafe` onto the job's own
`asyncio.Queue`: ("delta", text) while streaming, then ("done", Finished) or ("error", APIError).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from hotcold.serve.protocol import APIError, GenRequest
from hotcold.serve.text import TextStream


class QueueFull(Exception):
    pass


@dataclass
class Finished:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    completion_tokens: int
    prefill_seconds: float
    decode_seconds: float
    queued_seconds: float


@dataclass(eq=False)
class Job:
    req: GenRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)
    queue: JobQueue | None = None
    # set by the worker when it takes the job
    started: bool = False

    def emit(self, kind: str, value: Any) -> None:
        """Hand an event to the asyncio side (called from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled.set()

    def cancel(self) -> None:
        """The client is gone (or the answer was delivered): leave the queue, or stop at the next token."""
        self.cancelled.set()
        if self.queue is not None:
            self.queue.discard(self)


class JobQueue:
    """A bounded FIFO of jobs waiting for the worker (the job being generated is not counted)."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self._jobs: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False

    def put(self, job: Job) -> int:
        """Enqueue `job`; return the number of jobs ahead of it. Raises QueueFull at once when full."""
        with self._cv:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._jobs) >= self.capacity:
                raise QueueFull(f"{len(self._jobs)} requests are already waiting (--max-queue {self.capacity})")
            job.queue = self
            self._jobs.append(job)
            self._cv.notify()
            return len(self._jobs) - 1

    def get(self) -> Job | None:
        """The oldest waiting job; blocks until there is one. None once the queue is closed."""
        with self._cv:
            while not self._jobs and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            job = self._jobs.popleft()
            job.queue = None
            return job

    def discard(self, job: Job) -> None:
        with self._cv:
            try:
                self._jobs.remove(job)
            except ValueError:
                pass
            job.queue = None

    def close(self) -> list[Job]:
        """Stop handing out jobs; return those still waiting."""
        with self._cv:
            self._closed = True
            left = list(self._jobs)
            self._jobs.clear()
            self._cv.notify_all()
            return left

    def __len__(self) -> int:
        with self._cv:
            return len(self._jobs)


class Worker:
    """The thread that runs every generation on `model` (hotcold.runtime's HybridModel)."""

    def __init__(self, model: Any, queue: JobQueue, metrics: Any):
        self.model = model
        self.queue = queue
        self.metrics = metrics
        self.tokenizer = model.bundle.tokenizer
        self.current: Job | None = None
        self._thread = threading.Thread(target=self._loop, name="hotcold-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        for job in self.queue.close():
            job.cancelled.set()
            job.emit("error", APIError(503, "the server is shutting down; retry against another server",
                                       type="server_error", code="shutting_down"))
        cur = self.current
        if cur is not None:
            cur.cancelled.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            if job.cancelled.is_set():
                continue
            self.current = job
            job.started = True
            try:
                self._run(job)
            except APIError as e:
                job.emit("error", e)
            except Exception as e:  # noqa: BLE001 - one failed generation must not take the server down
                from hotcold.errors import HotcoldError

                if isinstance(e, HotcoldError):
                    job.emit("error", APIError(400, str(e), code="invalid_request"))
                else:
                    self.metrics.internal_error()
                    job.emit("error", APIError(500, f"internal error while generating: {type(e).__name__}: {e}",
                                               type="server_error", code="internal_error"))
            finally:
                self.current = None

    def _run(self, job: Job) -> None:
        req = job.req
        queued = time.perf_counter() - job.enqueued_at
        stream = TextStream(self.tokenizer, req.stop) if self.tokenizer is not None else None
        state = {"tokens": 0}

        def on_token(tok: int) -> bool:
            state["tokens"] += 1
            if job.cancelled.is_set():
                return True
            if stream is None:
                return False
            delta = stream.push(tok)
            if delta and req.stream:
                job.emit("delta", delta)
            return stream.stopped

        t0 = time.perf_counter()
        g = self.model.generate(req.prompt_ids, req.max_tokens, temperature=req.temperature, seed=req.seed,
                                on_token=on_token, top_p=req.top_p)
        if job.cancelled.is_set():
            self.metrics.finished(req, len(g.new_ids), g.prefill_seconds, g.decode_seconds, queued,
                                  time.perf_counter() - t0, cancelled=True, gpu_share=self._gpu_share())
            return
        if stream is not None:
            tail = stream.finish()
            if tail and req.stream:
                job.emit("delta", tail)
            text = stream.text
        else:  # a bundle without a tokenizer answers token ids, space-separated (as `hotcold run` prints them)
            text = " ".join(map(str, g.new_ids))
        stopped = stream is not None and stream.stopped
        reason = "stop" if stopped or g.stop_reason == "eos" else "length"
        self.metrics.finished(req, len(g.new_ids), g.prefill_seconds, g.decode_seconds, queued,
                              time.perf_counter() - t0, cancelled=False, gpu_share=self._gpu_share())
        job.emit("done", Finished(text=text, finish_reason=reason, completion_tokens=len(g.new_ids),
                                  prefill_seconds=g.prefill_seconds, decode_seconds=g.decode_seconds,
                                  queued_seconds=queued))

    def _gpu_share(self) -> float | None:
        """The runtime's GPU share of activated FFN neurons since it was loaded (None when it has none)."""
        report = getattr(self.model, "report", None)
        if report is None:
            return None
        rep = report()
        for phase in ("decode", "prefill"):
            share = (rep.get(phase) or {}).get("gpu_share")
            if share is not None:
                return float(share)
        return None
