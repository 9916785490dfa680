"""The model foundation on small models: loaders, dense reference, KV cache, tokenizer, rope scaling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hotcold.model.config import ModelConfig, RopeScaling, shape
from hotcold.model.dense import DenseModel
from hotcold.model.generate import generate
from hotcold.model.random import RandomSource
from hotcold.model.registry import load_source
from tests.gguf_util import write_gguf


def test_random_source_is_deterministic_and_lazy():
    a, b = load_source("random:tiny:seed=3"), load_source("random:tiny:seed=3")
    assert torch.equal(a.get("layers.1.w_gate"), b.get("layers.1.w_gate"))
    assert not torch.equal(a.get("layers.1.w_gate"), load_source("random:tiny:seed=4").get("layers.1.w_gate"))
    big = load_source("random:llama2-70b")  # 69B parameters: nothing is allocated until asked
    assert big.config.n_layers == 80 and big.config.n_ff == 28672 and big.config.n_kv_heads == 8
    assert abs(big.config.n_params / 1e9 - 68.98) < 0.01
    assert shape("llama3-70b").vocab_size == 128256
    one = load_source("random:llama2-70b:n_layers=1")
    assert one.config.n_layers == 1 and one.get("layers.0.attn_norm").shape == (8192,)


def test_kv_cache_decoding_equals_full_forward(tiny_source):
    m = DenseModel.from_source(tiny_source)
    toks = torch.randint(3, tiny_source.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    full = m.forward(toks)
    cache = m.new_cache(2, 24)
    parts = [m.forward(toks[:, :10], 0, cache), m.forward(toks[:, 10:17], 10, cache)]
    parts += [m.forward(toks[:, t:t + 1], t, cache) for t in range(17, 24)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_ffn_hook_observes_and_replaces(tiny_source):
    m = DenseModel.from_source(tiny_source)
    toks = torch.arange(3, 15)[None]
    seen = {}

    def observe(layer, x, a):
        seen[layer] = (x.shape, a.shape)

    base = m.forward(toks, hook=observe)
    cfg = tiny_source.config
    assert seen == {i: ((1, 12, cfg.dim), (1, 12, cfg.n_ff)) for i in range(cfg.n_layers)}
    same = m.forward(toks, hook=lambda layer, x, a: a.clone())
    torch.testing.assert_close(same, base)
    zeroed = m.forward(toks, hook=lambda layer, x, a: torch.zeros_like(a))
    assert (zeroed - base).abs().max() > 1e-3


def test_bf16_runs_close_to_fp32(tiny_source):
    toks = torch.arange(3, 20)[None]
    f32 = DenseModel.from_source(tiny_source).forward(toks)
    b16 = DenseModel.from_source(tiny_source, dtype=torch.bfloat16).forward(toks)
    assert b16.dtype == torch.float32  # logits always come back in fp32
    assert (f32.argmax(-1) == b16.argmax(-1)).float().mean() > 0.8


def _hf_dir(tmp_path: Path, src, arch: str = "LlamaForCausalLM", shards: int = 2, extra: dict | None = None) -> Path:
    """Write `src` as a sharded HF checkpoint with an index, as `save_pretrained` does."""
    from safetensors.torch import save_file

    from hotcold.model.hf_loader import hf_name

    cfg = src.config
    d = tmp_path / "hf"
    d.mkdir()
    names = src.names()
    weight_map = {}
    for k in range(shards):
        part = {hf_name(n): src.get(n).contiguous() for n in names[k::shards]}
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(d / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    conf = {"architectures": [arch], "model_type": "qwen2" if "Qwen2" in arch else "llama",
            "hidden_size": cfg.dim, "intermediate_size": cfg.n_ff, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads, "num_hidden_layers": cfg.n_layers, "vocab_size": cfg.vocab_size,
            "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_seq_len,
            "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "torch_dtype": "float32",
            **(extra or {})}
    (d / "config.json").write_text(json.dumps(conf))
    return d


@pytest.mark.parametrize("variant", ["llama", "llama3-rope", "qwen2-bias"])
def test_hf_dir_matches_transformers(tmp_path, variant):
    """Our loader + dense model against transformers on the same sharded safetensors directory."""
    transformers = pytest.importorskip("transformers")
    cfg = shape("tiny", max_seq_len=256)
    extra, arch = {}, "LlamaForCausalLM"
    if variant == "llama3-rope":
        cfg = cfg.replace(rope_scaling=RopeScaling(8.0, 1.0, 4.0, 32), rope_theta=500000.0)
        extra = {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}
    elif variant == "qwen2-bias":
        cfg, arch = cfg.replace(qkv_bias=True), "Qwen2ForCausalLM"
    src = RandomSource(cfg, seed=7)
    d = _hf_dir(tmp_path, src, arch, extra=extra)
    ours = load_source(str(d))
    assert ours.config.qkv_bias == (variant == "qwen2-bias")
    assert (ours.config.rope_scaling is not None) == (variant == "llama3-rope")
    toks = torch.randint(3, cfg.vocab_size, (1, 80), generator=torch.Generator().manual_seed(1))
    mine = DenseModel.from_source(ours).forward(toks)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(str(d), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(toks).logits
    assert (mine - ref).abs().max().item() < 1e-4


QTYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K"]


@pytest.mark.parametrize("qname", QTYPES)
def test_gguf_quant_types_and_qk_unpermute(tmp_path, qname):
    """Write a tiny model as GGUF (Q/K permuted as llama.cpp does), read it back, run it."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    cfg = shape("tiny")
    src = RandomSource(cfg, seed=2)
    qt = getattr(Q, qname)
    # K-quants need rows that are a multiple of 256 values: only the FFN's gate/up (dim 64 -> no), so
    # quantize w_down (in = n_ff = 256) with K-quants and keep Q/K in a type that can be compared.
    qtypes = {"w_down": qt} if qname in ("Q4_K", "Q6_K") else {"wq": qt, "wk": qt, "w_gate": qt, "w_up": qt, "w_down": qt}
    path = write_gguf(src, tmp_path / "m.gguf", qtypes)
    g = load_source(str(path))
    assert g.config.shape_key() == cfg.shape_key()
    if qname in ("Q4_K", "Q6_K"):
        # exact: our tensor is the gguf package's dequantization of the stored blocks, reshaped
        t = next(t for t in g.reader.tensors if t.name == "blk.0.ffn_down.weight")
        expect = dequantize(t.data, t.tensor_type).reshape(cfg.dim, cfg.n_ff)
        np.testing.assert_array_equal(g.get("layers.0.w_down").numpy(), expect)
        torch.testing.assert_close(g.get("layers.0.wq"), src.get("layers.0.wq"))  # F32 Q: permutation undone exactly
    else:
        tol = {"F32": 0, "F16": 2e-3, "BF16": 2e-2, "Q8_0": 3e-2, "Q4_0": 0.5, "Q4_1": 0.35, "Q5_0": 0.25}[qname]
        for n in ("layers.0.wq", "layers.1.wk", "layers.0.w_gate", "layers.2.w_down"):
            assert (g.get(n) - src.get(n)).abs().max() <= tol + 1e-7, n
    logits = DenseModel.from_source(g).forward(torch.arange(3, 30)[None])
    assert torch.isfinite(logits).all()
    if qname == "F32":
        torch.testing.assert_close(logits, DenseModel.from_source(src).forward(torch.arange(3, 30)[None]))


def test_gguf_tokenizer_and_chat_template(tmp_path):
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    path = write_gguf(RandomSource(shape("tiny")), tmp_path / "m.gguf", chat_template=template)
    tok = load_source(str(path)).tokenizer()
    text = "the cat sat on a mat\n  x = 42 ünïcödé"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    chat = tok.render_chat([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(chat)
    assert ids[0] == 1 and ids.count(1) == 2 and 2 in ids  # special tokens are single ids
    assert tok.eos_ids == (2,)


def test_generate_stops_at_eos(tiny_source):
    m = DenseModel.from_source(tiny_source)
    first = generate(m, [5, 6, 7], 8)
    eos = first.new_ids[2]
    g = generate(m, [5, 6, 7], 8, eos_ids=(eos,))
    assert g.new_ids == first.new_ids[:3] and g.stop_reason == "eos"
    assert len(first.new_ids) == 8 and first.stop_reason == "length"
    s1 = generate(m, [5, 6, 7], 8, temperature=1.0, seed=1).new_ids
    assert s1 == generate(m, [5, 6, 7], 8, temperature=1.0, seed=1).new_ids


def test_model_config_json_roundtrip():
    cfg = shape("llama3-70b").replace(rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192))
    assert ModelConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg


def test_atomic_dir_gets_a_normal_mode(tmp_path):
    import os
    import stat

    from hotcold.artifacts import atomic_dir

    with atomic_dir(tmp_path / "out") as d:
        (d / "f").write_text("x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~mask
    assert (tmp_path / "out" / "f").read_text() == "x"
