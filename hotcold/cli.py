"""The `hotcold` command: a thin shell over the library. Each stage registers its own commands."""

from __future__ import annotations

import importlib
import os
from typing import Annotated

import typer

from hotcold import __version__

app = typer.Typer(
    name="hotcold",
    help="Profile which FFN neurons fire, place them on GPU or CPU under a memory budget, export split "
         "weights, and run them.\n\nStart with `hotcold demo`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Each module defines `register(app)`; imported here so `--help` lists every command. They import
# nothing heavy at module level (torch, onnx and CUDA code load inside the commands that need them).
STAGES = (
    "hotcold.model.cli",
    "hotcold.profiler.cli",
    "hotcold.solver.cli",
    "hotcold.exporter.cli",
    "hotcold.runtime.cli",
    "hotcold.bench.cli",
    "hotcold.study.cli",
    "hotcold.serve.cli",
    "hotcold.quality.cli",
)


_ENV_DEBUG = os.environ.get("HOTCOLD_DEBUG")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hotcold {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    # --debug for this invocation only (in-process callers such as tests invoke the app many times);
    # HOTCOLD_DEBUG=1 in the environment still turns it on for every command.
    if debug:
        os.environ["HOTCOLD_DEBUG"] = "1"
    elif _ENV_DEBUG is None:
        os.environ.pop("HOTCOLD_DEBUG", None)
    else:
        os.environ["HOTCOLD_DEBUG"] = _ENV_DEBUG


for _mod in STAGES:
    try:
        _module = importlib.import_module(_mod)
    except ModuleNotFoundError as _e:  # a stage not built yet in this checkout
        if not (_e.name and _mod.startswith(_e.name)):
            raise
        continue
    _module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
