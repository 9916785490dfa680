"""The exporter: a model + a Placement (+ its Profile) -> a Bundle (format.py), and `hotcold compile`.

    from hotcold.exporter import export_bundle, ExportOptions
    export_bundle("smollm2-135m", placement, "out/bundle", profile=profile, options=ExportOptions(sparsity=0.5))

Names resolve lazily so that `import hotcold.exporter` (the CLI does) does not import torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_bundle", "ExportOptions", "ExportResult", "compile_bundle"]


def __getattr__(name: str) -> Any:
    if name in ("export_bundle", "ExportOptions", "ExportResult"):
        from hotcold.exporter import export

        return getattr(export, name)
    if name == "compile_bundle":
        from hotcold.exporter.compile import compile_bundle

        return compile_bundle
    raise AttributeError(name)
