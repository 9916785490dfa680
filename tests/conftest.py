"""Shared fixtures: the tiny random LLaMA (fast), the real SmolLM2-135M (truth), and MBPP's path."""

from __future__ import annotations

import os
from pathlib import Path

# Before torch loads OpenMP: spinning OpenMP threads make torch ~30x slower when the suite's subprocesses
# (sandbox, torchrun) share the 2 cores with it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

from tests.mbpp_util import require_mbpp  # noqa: E402


@pytest.fixture(scope="session")
def mbpp_path() -> Path:
    """MBPP's mbpp.jsonl ($HOTCOLD_MBPP or shared/data/ above the repo); the test skips without it."""
    return require_mbpp()


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    """The real SmolLM2-135M-Instruct GGUF, fetched once into $HOTCOLD_HOME."""
    from hotcold.model.registry import fetch

    return fetch("smollm2-135m", quiet=True)


@pytest.fixture(scope="session")
def smollm_source(smollm_path):
    from hotcold.model.gguf_loader import GGUFSource

    return GGUFSource(smollm_path)


@pytest.fixture(scope="session")
def smollm_dense(smollm_source):
    from hotcold.model.dense import DenseModel

    return DenseModel.from_source(smollm_source, max_len=1024)


@pytest.fixture(scope="module")
def smollm_dense_fp64(smollm_source):
    """SmolLM2 in float64: the exact reference that fp32 results are measured against (tests/fp64_util.py)."""
    import torch

    from hotcold.model.dense import DenseModel

    return DenseModel.from_source(smollm_source, dtype=torch.float64, max_len=1024)


@pytest.fixture(scope="session")
def tiny_source():
    from hotcold.model.registry import load_source

    return load_source("random:tiny")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny matmuls gain
    nothing from threads, and on a shared 2-core machine spinning OpenMP threads make decoding ~30x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
