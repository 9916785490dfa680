"""Device names, torch dtypes and timing: the one definition every stage uses.

torch is imported inside the functions, so importing this module costs nothing (the solver and the memory
account stay torch-free).
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any, Callable

from hotcold.errors import InputError

DEVICES = ("auto", "cuda", "cpu")


def resolve_device(device: Any = "auto", local_rank: int | None = None):
    """'auto' -> cuda when torch sees one, else cpu; 'cpu', 'cuda', 'cuda:N' or a torch.device as given.
    local_rank picks the GPU for a bare 'cuda' (one process per GPU under torchrun). One clear InputError
    for cuda without a GPU and for an unknown name."""
    import torch

    if isinstance(device, torch.device):
        return device
    d = str(device or "auto").lower()
    if d == "auto":
        d = "cuda" if torch.cuda.is_available() else "cpu"
    if d == "cuda" or d.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {device} was asked for but torch sees no CUDA device here",
                             "use --device auto or cpu")
        if d == "cuda" and local_rank is not None:
            return torch.device("cuda", local_rank)
        return torch.device(d)
    if d != "cpu":
        raise InputError(f"unknown device {device!r}", f"use one of: {', '.join(DEVICES)}")
    return torch.device("cpu")


@functools.cache
def torch_dtypes() -> dict[str, Any]:
    """Canonical float dtype name (hotcold.memory.canonical_dtype) -> torch dtype."""
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: Any):
    """'fp16', 'float16', 'half', torch.float16, ... -> torch.float16; an InputError for anything else
    (quantized formats have no torch dtype: they are hotcold.quant.QTensor)."""
    from hotcold.memory import FLOAT_DTYPES, canonical_dtype

    d = canonical_dtype(name)
    if d not in FLOAT_DTYPES:
        raise InputError(f"{name!r} is a quantized format, not a float dtype",
                         f"use one of: {', '.join(FLOAT_DTYPES)} here")
    return torch_dtypes()[d]


def synchronize(device: Any) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], Any], reps: int, sync: Any = None, warm: int = 1,
                deadline: float | None = None) -> float:
    """Median seconds of `reps` calls of fn after `warm` untimed ones. sync: a callable, or a device to
    synchronise, after each call (None: nothing to wait for). deadline (perf_counter): stop early once it
    passes, after at least 3 timed calls."""
    if sync is None:
        wait: Callable[[], None] = lambda: None  # noqa: E731
    elif callable(sync):
        wait = sync
    else:
        wait = lambda: synchronize(sync)  # noqa: E731
    for _ in range(warm):
        fn()
    wait()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        wait()
        ts.append(time.perf_counter() - t0)
        if deadline is not None and time.perf_counter() > deadline and len(ts) >= 3:
            break
    return statistics.median(ts)
