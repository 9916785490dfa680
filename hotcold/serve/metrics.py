"""What the server counts, rendered in Prometheus' text exposition format (version 0.0.4) for `/metrics`.

Counters only grow; rates (tokens/s over a window) are what Prometheus' `rate()` is for. The gauges are
the queue, the last finished request's decode speed, and the runtime's GPU share of activated neurons.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any


def _labels(d: dict[str, str]) -> str:
    if not d:
        return ""
    esc = {k: str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for k, v in d.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(esc.items())) + "}"


def _value(v: float) -> str:
    if v != v:
        return "NaN"
    return repr(float(v)) if isinstance(v, float) else str(int(v))


def rss_bytes() -> int | None:
    """This process' resident memory (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class Metrics:
    def __init__(self, model_name: str, queue_capacity: int):
        self.model_name = model_name
        self.queue_capacity = queue_capacity
        self.started = time.time()
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}  # (endpoint, status) -> count
        self.rejected_queue_full = 0
        self.cancelled = 0
        self.completed = 0
        self.internal_errors = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0
        self.queued_seconds = 0.0
        self.busy_seconds = 0.0
        self.last_decode_tps: float | None = None
        self.gpu_share: float | None = None

    # ---- updates (HTTP side and worker thread) ------------------------------------------------------
    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            key = (endpoint, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1

    def queue_full(self) -> None:
        with self._lock:
            self.rejected_queue_full += 1

    def internal_error(self) -> None:
        with self._lock:
            self.internal_errors += 1

    def finished(self, req: Any, new_tokens: int, prefill_s: float, decode_s: float, queued_s: float, busy_s: float,
                 cancelled: bool, gpu_share: float | None) -> None:
        with self._lock:
            if cancelled:
                self.cancelled += 1
            else:
                self.completed += 1
            self.prompt_tokens += len(req.prompt_ids)
            self.generated_tokens += new_tokens
            self.prefill_seconds += prefill_s
            self.decode_seconds += decode_s
            self.queued_seconds += queued_s
            self.busy_seconds += busy_s
            # the first new token comes from the prefill: decode speed counts the tokens after it
            if new_tokens > 1 and decode_s > 0:
                self.last_decode_tps = (new_tokens - 1) / decode_s
            if gpu_share is not None:
                self.gpu_share = gpu_share

    # ---- exposition -------------------------------------------------------------------------------
    def render(self, queue_depth: int, running: int) -> str:
        with self._lock:
            m = dict(self.__dict__)
            requests = dict(self.requests)
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[dict[str, str], float]]) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, v in samples:
                lines.append(f"{name}{_labels(labels)} {_value(v)}")

        model = {"model": self.model_name}
        metric("hotcold_requests_total", "counter", "HTTP requests answered, by endpoint and status code.",
               [({"endpoint": e, "status": s}, n) for (e, s), n in sorted(requests.items())])
        metric("hotcold_requests_rejected_total", "counter", "Requests answered 429 because the queue was full.",
               [(model, m["rejected_queue_full"])])
        metric("hotcold_generations_completed_total", "counter", "Generations that ran to their end.",
               [(model, m["completed"])])
        metric("hotcold_generations_cancelled_total", "counter",
               "Generations stopped because the client went away.", [(model, m["cancelled"])])
        metric("hotcold_internal_errors_total", "counter", "Generations that failed inside the server.",
               [(model, m["internal_errors"])])
        metric("hotcold_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [(model, m["prompt_tokens"])])
        metric("hotcold_generation_tokens_total", "counter", "Tokens generated.", [(model, m["generated_tokens"])])
        metric("hotcold_prefill_seconds_total", "counter", "Seconds spent in prefill.", [(model, m["prefill_seconds"])])
        metric("hotcold_decode_seconds_total", "counter", "Seconds spent decoding.", [(model, m["decode_seconds"])])
        metric("hotcold_queue_wait_seconds_total", "counter", "Seconds requests waited in the queue, summed.",
               [(model, m["queued_seconds"])])
        metric("hotcold_busy_seconds_total", "counter", "Seconds the worker spent generating.",
               [(model, m["busy_seconds"])])
        busy = m["busy_seconds"]
        metric("hotcold_tokens_per_second", "gauge",
               "Tokens generated per second of generation time, since the server started.",
               [(model, m["generated_tokens"] / busy if busy > 0 else 0.0)])
        metric("hotcold_decode_tokens_per_second", "gauge", "Decode speed of the last finished generation.",
               [(model, m["last_decode_tps"] if m["last_decode_tps"] is not None else float("nan"))])
        metric("hotcold_gpu_share", "gauge",
               "GPU share of activated FFN neurons since the model was loaded (the runtime's measurement).",
               [(model, m["gpu_share"] if m["gpu_share"] is not None else float("nan"))])
        metric("hotcold_queue_depth", "gauge", "Requests waiting for the worker.", [(model, queue_depth)])
        metric("hotcold_queue_capacity", "gauge", "Requests that may wait before the server answers 429.",
               [(model, self.queue_capacity)])
        metric("hotcold_requests_running", "gauge", "Generations in progress (the runtime runs one at a time).",
               [(model, running)])
        rss = rss_bytes()
        if rss is not None:
            metric("process_resident_memory_bytes", "gauge", "Resident memory of the server process.", [({}, rss)])
        metric("process_start_time_seconds", "gauge", "Start time of the server, seconds since the epoch.",
               [({}, self.started)])
        return "\n".join(lines) + "\n"
