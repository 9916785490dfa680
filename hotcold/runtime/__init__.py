"""The one hybrid runtime: load a Bundle (and only a Bundle) and generate with a GPU side and a CPU worker.

    from hotcold.runtime import load
    m = load("out/bundle", mode="threshold")          # verifies every file, memory-maps the weights
    g = m.generate(m.bundle.tokenizer.chat_ids("Write a function ..."), max_new_tokens=64)
    m.report()                                          # decode and prefill times, GPU share, memory, kernels

The same model object runs on a CPU-only machine (the GPU side on the CPU, no graphs) and on CUDA
(graphs, pinned exchange, Triton GPU ops, the compiled cold kernel). Names resolve lazily so that
`import hotcold.runtime` (the CLI does) does not import torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["HybridModel", "load", "from_bundle", "run_prompt", "MODES"]


def __getattr__(name: str) -> Any:
    if name == "HybridModel":
        from hotcold.runtime.model import HybridModel

        return HybridModel
    if name in ("load", "from_bundle"):
        from hotcold.runtime import build

        return getattr(build, name)
    if name == "MODES":
        from hotcold.runtime.coldkernel import MODES

        return MODES
    if name == "run_prompt":
        from hotcold.runtime.run import run_prompt

        return run_prompt
    raise AttributeError(name)
