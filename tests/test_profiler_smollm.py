"""Profiler truth tests on the real SmolLM2-135M with a few MBPP prompts: teacher-forced streaming (one layer
resident) == in-memory counts exactly, and generate-mode counts == an independent re-computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hotcold.profiler.activation import ActivationSpec
from hotcold.profiler.engine import ProfileOptions, run_profile
from hotcold.workloads import load_dataset

pytestmark = [pytest.mark.smollm, pytest.mark.usefixtures("one_thread")]  # one_thread: tests/conftest.py


@pytest.fixture(scope="module")
def mbpp3(mbpp_path):
    return load_dataset(f"mbpp:{mbpp_path}", "test", limit=3)


def test_teacher_forced_streaming_equals_in_memory(smollm_source, smollm_dense, mbpp3):
    # (calibrated thresholds stream identically too: test_profiler.py, on the tiny model)
    opts = ProfileOptions(mode="teacher-forced", batch_size=2, activation=ActivationSpec(threshold=0.05), samples=8)
    mem = run_profile(smollm_source, mbpp3, opts, model=smollm_dense).profile
    st = run_profile(smollm_source, mbpp3, ProfileOptions(**{**opts.__dict__, "stream": True})).profile
    for name in ("active_count_prefill", "active_count_decode", "hist_prefill", "hist_decode"):
        np.testing.assert_array_equal(getattr(mem, name), getattr(st, name), err_msg=name)
    assert mem.token_count == st.token_count and mem.token_count["decode"] > 50
    for k in ("x", "mask", "phase"):
        np.testing.assert_array_equal(mem.samples[k], st.samples[k])
    tokens = mem.token_count["prefill"] + mem.token_count["decode"]
    assert 0.05 < mem.active_count.sum() / (tokens * mem.n_ff * mem.n_layers) < 0.95  # a threshold that bites


def test_generate_counts_equal_recomputation(smollm_source, smollm_dense, mbpp3):
    from hotcold.profiler.sequences import encode_tasks, tokenizer_for

    new, t = 10, 0.05
    opts = ProfileOptions(mode="generate", max_new_tokens=new, activation=ActivationSpec(threshold=t), keep_tokens=True)
    tasks = load_dataset(mbpp3.spec, "test", limit=2)
    res = run_profile(smollm_source, tasks, opts, model=smollm_dense)
    tok = tokenizer_for(smollm_source)
    model = smollm_dense
    L, Fn = model.cfg.n_layers, model.cfg.n_ff
    expect = np.zeros((2, L, Fn), np.int64)
    tokens = [0, 0]
    for s in encode_tasks(tasks.tasks, tok, "generate"):
        gen = res.generated[s.id]  # (bench_profiler.py checks they equal plain generation's)
        rec: list[tuple[int, np.ndarray]] = []

        def hook(layer, x, a):
            rec.append((layer, a.abs().reshape(-1, Fn).numpy()))

        cache = model.new_cache(1, len(s.prompt) + new)
        with torch.inference_mode():
            model.forward(torch.tensor([s.prompt]), 0, cache, hook=hook, last_only=True)
            for layer, a in rec:
                expect[0, layer] += (a > t).sum(0)
            rec.clear()
            for i, tk in enumerate(gen[:-1]):  # every generated token but the last is fed back
                model.forward(torch.tensor([[tk]]), len(s.prompt) + i, cache, hook=hook, last_only=True)
            for layer, a in rec:
                expect[1, layer] += (a > t).sum(0)
        tokens[0] += len(s.prompt)
        tokens[1] += len(gen) - 1
    p = res.profile
    assert p.token_count == {"prefill": tokens[0], "decode": tokens[1]}
    np.testing.assert_array_equal(p.active_count_prefill, expect[0])
    np.testing.assert_array_equal(p.active_count_decode, expect[1])
    assert p.hist_decode.sum() == tokens[1] * L * Fn
