"""What every CLI command shares: consoles, option aliases, and the error boundary.

Results go to stdout (`out`), progress and logs to stderr (`err`). A `HotcoldError` becomes one red
line with its fix and the error's exit code; `--debug` (or HOTCOLD_DEBUG=1) shows the traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from hotcold.errors import HotcoldError

# Piped or redirected stdout has no terminal width; rich would assume 80 columns and cut wide tables
# ("GPU …"), so results get room for a full table there ($COLUMNS still wins).
out = Console(highlight=False, soft_wrap=True,
              width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])

# ---- shared option aliases -------------------------------------------------------------------
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Model: an id (smollm2-135m), a .gguf file, or a Hugging Face directory.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")]
OutDirOpt = Annotated[Path, typer.Option("--out", "-o", help="Directory to write (written to a temp dir, then renamed into place).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="Where the dense model runs: cpu, cuda or auto.")]


def debug_enabled() -> bool:
    return os.environ.get("HOTCOLD_DEBUG", "") not in ("", "0")


def fail(e: HotcoldError) -> typer.Exit:
    """Print one red line for `e` and return the typer.Exit to raise."""
    if debug_enabled():
        err.print(traceback.format_exc(), markup=False)
    msg = f"error: {e.what}"
    if e.fix:
        msg += f" — {e.fix}"
    err.print(f"[bold red]{escape(msg)}[/]")
    return typer.Exit(code=e.exit_code)


def escape(s: str) -> str:
    from rich.markup import escape as _escape

    return _escape(s)


def command(fn: F) -> F:
    """Error boundary for a CLI command: domain errors -> one line + exit code; no tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except HotcoldError as e:
            raise fail(e) from None
        except KeyboardInterrupt:
            err.print("[bold red]interrupted — nothing was written; re-run the command to start again[/]")
            raise typer.Exit(code=130) from None
        except FileNotFoundError as e:
            raise fail(HotcoldError(f"file not found: {e.filename}", "check the path")) from None
        except MemoryError:
            raise fail(HotcoldError("out of memory", "use a smaller model, batch or budget")) from None
        except Exception as e:  # noqa: BLE001 - the boundary: never show a bare traceback
            if debug_enabled():
                err.print(traceback.format_exc(), markup=False)
            err.print(f"[bold red]internal error: {escape(type(e).__name__)}: {escape(str(e))}[/] "
                      "— this is a bug in hotcold; re-run with --debug and report the traceback")
            raise typer.Exit(code=1) from None

    return wrapper  # type: ignore[return-value]


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


@contextmanager
def progress(disable: bool = False):
    """A rich progress bar on stderr (ETA, elapsed)."""
    p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                 TimeRemainingColumn(), console=err, disable=disable, transient=False)
    with p:
        yield p
