"""The slim sparse runtime: load a Bundle (and only a Bundle) and generate with a GPU side and a CPU worker.

    from hotcold.runtime import load
    m = load("out/bundle", mode="threshold")          # verifies every file, memory-maps the weights
    g = m.generate(m.bundle.tokenizer.chat_ids("Write a function ..."), max_new_tokens=64)
    m.report()                                          # per-layer GPU/CPU time, GPU share, peak memory

Names resolve lazily so that `import hotcold.runtime` (the CLI does) does not import torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Bundle", "HybridModel", "load", "run_prompt", "MODES"]


def __getattr__(name: str) -> Any:
    if name == "Bundle":
        from hotcold.runtime.bundle import Bundle

        return Bundle
    if name in ("HybridModel", "load", "MODES"):
        from hotcold.runtime import model

        return getattr(model, name)
    if name == "run_prompt":
        from hotcold.runtime.run import run_prompt

        return run_prompt
    raise AttributeError(name)
