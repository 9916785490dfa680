"""Batched greedy generation (left padding, masks, rows leaving the batch), pass@1 scoring, intervals,
checkpoints and the `hotcold eval pass1` command, on the tiny random LLaMA and MBPP / HumanEval data."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from hotcold.cli import app
from hotcold.errors import IncompatibleError
from hotcold.model.dense import DenseModel
from hotcold.model.generate import generate, generate_batch
from hotcold.model.registry import load_source
from hotcold.quality.passk import Pass1Config, intervals, run_pass1, task_code
from hotcold.quality.sandbox import pass_at_1
from tests.gguf_util import write_gguf

pytestmark = pytest.mark.usefixtures("one_thread")
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tiny():
    return DenseModel.from_source(load_source("random:tiny"))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from hotcold.model.config import shape
    from hotcold.model.random import RandomSource

    # the tiny byte-level vocabulary spends ~1 token per character: MBPP prompts need a longer context
    return write_gguf(RandomSource(shape("tiny", max_seq_len=2048)), tmp_path_factory.mktemp("g") / "tiny.gguf",
                      chat_template=TEMPLATE)


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (n,), generator=g).tolist() for n in lengths]


def test_padded_batch_logits_equal_each_prompt_alone(tiny):
    ps = prompts([5, 17, 9, 30, 1])
    L = max(map(len, ps))
    pad = torch.tensor([L - len(p) for p in ps])
    x = torch.tensor([[0] * (L - len(p)) + p for p in ps])
    batched = tiny.forward(x, pad=pad)
    assert torch.isfinite(batched).all()  # pad slots see only pad slots: no all-masked rows, no NaN
    for i, p in enumerate(ps):
        alone = tiny.forward(torch.tensor([p]))[0]
        torch.testing.assert_close(batched[i, L - len(p):], alone, atol=1e-4, rtol=1e-4)


def test_generate_batch_equals_generate_one_by_one(tiny):
    ps = prompts([5, 17, 9, 30])
    alone = [generate(tiny, p, 24).new_ids for p in ps]
    assert [g.new_ids for g in generate_batch(tiny, ps, 24)] == alone
    # an EOS that some rows emit early: those rows leave the batch (the cache drops them), the rest go on
    eos = alone[1][3]
    want = [a[:a.index(eos) + 1] if eos in a else a for a in alone]
    got = generate_batch(tiny, ps, 24, eos_ids=[eos])
    assert [g.new_ids for g in got] == want
    assert [g.stop_reason for g in got] == ["eos" if eos in a else "length" for a in alone]
    assert any(g.stop_reason == "length" for g in got) and any(g.stop_reason == "eos" for g in got)


def test_generate_batch_stop_callback_and_limits(tiny):
    ps = prompts([4, 8, 6], seed=1)
    got = generate_batch(tiny, ps, 10, stop=lambda r, new: r == 1 and len(new) == 3)
    assert [len(g.new_ids) for g in got] == [10, 3, 10]
    assert got[1].stop_reason == "stopped"
    with pytest.raises(ValueError):
        generate_batch(tiny, [[1, 2], []], 4)


def test_intervals_match_their_formulas():
    k, n = 37, 100
    r = intervals(k, n)
    p, z = k / n, 1.959963984540054
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert r["wilson"] == pytest.approx([centre - half, centre + half], abs=1e-4)
    # Clopper-Pearson at k = 0: the upper bound solves (1 - p)^n = alpha / 2
    assert intervals(0, 10)["clopper_pearson"] == pytest.approx([0.0, 1 - 0.025 ** (1 / 10)], abs=1e-4)
    lo, hi = r["clopper_pearson"]
    assert lo < r["wilson"][0] and hi > r["wilson"][1]  # the exact interval is the wider one here


def test_reference_answers_in_a_fence_pass_mbpp(mbpp_path):
    from hotcold.workloads import load_dataset

    tasks = list(load_dataset(f"mbpp:{mbpp_path}", "test", limit=6))
    answers = [f"Here is the function:\n```python\n{t.code}\n```\nIt works because ..." for t in tasks]
    codes = [task_code(t, a) for t, a in zip(tasks, answers)]
    assert all(how == "fence" for _, how in codes)
    rep = pass_at_1(tasks, [c for c, _ in codes], extract=False)
    assert rep.passed == len(tasks), [r.detail for r in rep.results]


def test_humaneval_canonical_solutions_pass_and_prompt_imports_are_kept():
    from hotcold.workloads import HUMANEVAL_TEMPLATE, load_dataset, pass1_message

    ds = load_dataset("humaneval")
    assert len(ds) == 164 and ds.tasks[0].entry_point == "has_close_elements"
    tasks = list(ds.tasks[:12])
    assert pass1_message(tasks[0]) == HUMANEVAL_TEMPLATE.format(prompt=tasks[0].text.strip())
    # an answer that rewrites the function without the prompt's `from typing import List`
    answers = []
    for t in tasks:
        body = t.code.replace("from typing import List, Tuple", "").replace("from typing import List", "")
        answers.append(f"```python\n{body}\n```")
    codes = [task_code(t, a)[0] for t, a in zip(tasks, answers)]
    assert codes[0].startswith("from typing import List\n")
    rep = pass_at_1(tasks, codes, extract=False)
    assert rep.passed == len(tasks), [(r.task_id, r.detail) for r in rep.results if not r.passed]
    wrong = pass_at_1(tasks[:2], [t.text + "    return None\n" for t in tasks[:2]], extract=False)
    assert wrong.passed == 0


def test_run_pass1_writes_every_task_and_resumes_from_its_checkpoint(tiny_gguf, tmp_path, mbpp_path):
    from hotcold.workloads import load_dataset

    src = load_source(str(tiny_gguf))
    tok = src.tokenizer()
    m = DenseModel.from_source(src)
    tasks = list(load_dataset(f"mbpp:{mbpp_path}", "test", limit=5))
    cfg = Pass1Config(max_new_tokens=6, batch_size=2, checkpoint_every=2)
    out = tmp_path / "p.json"
    header = {"model": {"fingerprint": src.fingerprint}}

    class Stop(Exception):
        pass

    def interrupt(res):
        if res.n >= 2:
            raise Stop

    with pytest.raises(Stop):
        run_pass1(m, tok, tasks, cfg, out, header=header, show_progress=False, on_batch=interrupt)
    partial = tmp_path / "p.json.partial.json"
    assert not out.exists() and partial.is_file()
    assert len(json.loads(partial.read_text())["tasks"]) == 2
    with pytest.raises(IncompatibleError, match="another max_new_tokens"):
        run_pass1(m, tok, tasks, Pass1Config(max_new_tokens=7, batch_size=2), out, header=header, show_progress=False)
    res = run_pass1(m, tok, tasks, cfg, out, header=header, show_progress=False)
    d = json.loads(out.read_text())
    assert not partial.exists()
    assert [t["id"] for t in d["tasks"]] == [t.id for t in tasks]  # every task once, in task order
    assert len(d["sessions"]) == 2 and d["sessions"][1]["resumed_with"] == 2
    assert d["n"] == 5 and d["passed"] == res.passed == 0  # a random model solves nothing
    assert all(t["status"] in ("fail", "error") and t["new_tokens"] <= 6 for t in d["tasks"])
    assert d["interval_95"]["clopper_pearson"][0] == 0.0 and d["throughput"]["tasks"] == 5


def test_eval_pass1_cli_runs_and_rejects_bad_input(tiny_gguf, tmp_path, mbpp_path):
    runner = CliRunner()
    out = tmp_path / "cli.json"
    r = runner.invoke(app, ["eval", "pass1", "-m", str(tiny_gguf), "--dataset", f"mbpp:{mbpp_path}", "--limit", "2",
                            "-n", "4", "-b", "2", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "pass@1 0/2" in r.stdout and json.loads(out.read_text())["n"] == 2
    txt = tmp_path / "p.txt"
    txt.write_text("write a function\n")
    for args, needle in ((["--dataset", f"txt:{txt}"], "without tests"),
                         (["--dataset", f"mbpp:{mbpp_path}", "--dtype", "fp16"], "--dtype fp16"),
                         (["--dataset", "nope"], "unknown dataset")):
        r = runner.invoke(app, ["eval", "pass1", "-m", str(tiny_gguf), "-o", str(tmp_path / "x.json"), *args])
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr


def test_answers_are_reduced_to_their_definitions_and_stop_at_their_own_tests():
    from hotcold.quality.extract import definitions_only
    from hotcold.quality.passk import _CLOSED_FENCE, _TEST_AFTER_DEF

    code = ("import math\nLIMIT = 10\n\n@staticmethod\ndef f(x):\n    assert x\n    return math.sqrt(x)\n\n"
            "result = f(4)\nprint(result)\nassert f(9) == 3\nif __name__ == '__main__':\n    f(0)\n")
    kept = definitions_only(code)
    assert kept == "import math\nLIMIT = 10\n@staticmethod\ndef f(x):\n    assert x\n    return math.sqrt(x)\n"
    assert definitions_only("def broken(:\n") == "def broken(:\n"  # unparseable: left to the sandbox
    answer = "Here:\n```python\ndef f(x):\n    # test the input\n    return x\n\n"
    assert not _TEST_AFTER_DEF.search(answer) and not _CLOSED_FENCE.search(answer)  # indented: the body
    assert _TEST_AFTER_DEF.search(answer + "# Test cases\n")
    assert _TEST_AFTER_DEF.search(answer + "assert f(1) == 1")
    assert not _TEST_AFTER_DEF.search("```python\nassert True\n")  # nothing defined yet
    assert _CLOSED_FENCE.search(answer + "```\n")


def test_threshold_emulation_is_the_runtimes_rule_on_decode_steps_only(tiny):
    """Hot neurons dense, cold ones kept where |silu(g)·u| > t_l, prefill untouched: checked against the FFN
    written out by hand for one decode step, and sparsity 0 (t = 0, nothing exactly zero) equal to dense."""
    import numpy as np

    from hotcold.model.dense import ffn_activation
    from hotcold.quality.sparse import ThresholdEmulation

    cfg = tiny.cfg
    rng = np.random.default_rng(0)
    hot = rng.random((cfg.n_layers, cfg.n_ff)) < 0.3
    ps = prompts([7, 12])
    L = max(map(len, ps))
    x = torch.tensor([[0] * (L - len(p)) + p for p in ps])
    pad = torch.tensor([L - len(p) for p in ps])
    # a threshold per layer at the median |a| of that layer's prefill activations: about half the cold are cut
    acts = []
    tiny.forward(x, pad=pad, hook=lambda l, xx, a: acts.append(a.abs().flatten().median().item()))
    emu = ThresholdEmulation(tiny, hot, acts)
    c0, c1 = tiny.new_cache(2, L + 1), tiny.new_cache(2, L + 1)
    torch.testing.assert_close(emu.forward(x, 0, c0, pad=pad), tiny.forward(x, 0, c1, pad=pad))  # prefill dense
    step = torch.tensor([[5], [9]])
    got = emu.forward(step, L, c0, pad=pad)
    want_hook_calls = []

    def by_hand(l, xx, a):
        want_hook_calls.append(l)
        lw = tiny.layers[l]
        a2 = ffn_activation(cfg, lw, xx)
        keep = torch.as_tensor(hot[l]) | (a2.abs() > acts[l])
        return a2 * keep

    want = tiny.forward(step, L, c1, hook=by_hand, pad=pad)
    torch.testing.assert_close(got, want)
    assert want_hook_calls == list(range(cfg.n_layers))
    assert not torch.allclose(got, tiny.forward(step, L, tiny.new_cache(2, L + 1), pad=pad))  # it did cut
    frac = emu.measured()["cold_active_fraction"]
    assert 0.2 < frac < 0.8  # a median threshold of prefill activations keeps about half at the step
    dense_emu = ThresholdEmulation(tiny, np.zeros_like(hot), [0.0] * cfg.n_layers)
    torch.testing.assert_close(dense_emu.forward(step, 0), tiny.forward(step, 0))
    assert dense_emu.measured()["cold_active_fraction"] == 1.0


def test_eval_pass1_sparse_runs_and_records_its_rule(tiny_gguf, tmp_path, mbpp_path):
    from hotcold.model.registry import load_source as ls
    from tests.hybrid_util import tiny_profile

    src = ls(str(tiny_gguf))
    prof_dir = tmp_path / "prof"
    tiny_profile(src, limit=3).save(prof_dir)
    runner = CliRunner()
    out = tmp_path / "sparse.json"
    base = ["eval", "pass1", "-m", str(tiny_gguf), "--dataset", f"mbpp:{mbpp_path}", "--limit", "2", "-n", "4",
            "-b", "2"]
    r = runner.invoke(app, [*base, "-o", str(out), "--sparsity", "0.5", "--profile", str(prof_dir),
                            "--gpu-share", "0.3"])
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    sp = d["sparse"]
    assert sp["rule"] == "product" and sp["sparsity"] == 0.5 and len(sp["thresholds"]) == src.config.n_layers
    assert 0.25 < sp["hot_fraction"] < 0.35 and "fixed placement at 30%" in sp["placement"]["how"]
    measured = d["sessions"][-1]["sparse_measured"]["cold_active_fraction"]
    assert 0.0 < measured < 1.0 and "sparse decode: product rule at sparsity 0.5" in r.stdout
    # a placement solved again from the same profile is the same run: a longer --limit resumes the checkpoint
    # (a solved placement's manifest carries its solve time; the key is its hot set)
    ck = tmp_path / "resume.json"
    part = ck.with_suffix(".json.partial.json")
    r = runner.invoke(app, [*base[:-4], "-n", "4", "-b", "2", "--limit", "1", "--checkpoint-every", "1", "-o", str(ck),
                            "--sparsity", "0.5", "--profile", str(prof_dir), "--gpu-share", "0.3"])
    assert r.exit_code == 0, r.output
    d1 = json.loads(ck.read_text())
    part.write_text(ck.read_text())
    r = runner.invoke(app, [*base[:-4], "-n", "4", "-b", "2", "--limit", "1", "-o", str(ck), "--sparsity", "0.5",
                            "--profile", str(prof_dir), "--gpu-share", "0.3"])
    assert r.exit_code == 0, r.output
    d2 = json.loads(ck.read_text())
    assert d2["sparse"] == d1["sparse"] and d2["sparse"]["placement"]["hot_set_sha256"]
    assert d2["sessions"][-1]["resumed_with"] == 1
    for args, needle in ((["--sparsity", "0.5"], "--sparsity needs --profile"),
                         (["--profile", str(prof_dir)], "--profile without --sparsity"),
                         (["--sparsity", "0.5", "--profile", str(prof_dir), "--gpu-share", "0.3", "--placement",
                           str(tmp_path)], "both given"),
                         (["--sparsity", "0.5", "--profile", str(prof_dir), "--gpu-share", "0.3", "--policy", "x"],
                          "--policy x")):
        r = runner.invoke(app, [*base, "-o", str(tmp_path / "x.json"), *args])
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        assert len(lines) == 1 and needle in lines[0], r.stderr
