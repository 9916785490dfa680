"""hotcold.memory: the one memory account, checked against real tensors and hand arithmetic."""

from __future__ import annotations

import pytest
import torch

from hotcold.errors import InputError
from hotcold.memory import (
    buffer_bytes, canonical_dtype, default_kv_dtype, default_predictor_rank, dense_bytes, format_bytes,
    kv_cache_bytes, neuron_bytes, parse_bytes, placement_bytes, predictor_bytes, row_bytes, small_dtype,
    tensor_bytes,
)
from hotcold.model.config import SHAPES, shape


@pytest.mark.parametrize("text,expected", [
    ("24GiB", 24 * 2**30), ("48GB", 48 * 10**9), ("512MiB", 512 * 2**20), ("1000000", 10**6),
    ("1.5 TB", 15 * 10**11), ("2gib", 2 * 2**30), (4096, 4096), ("0", 0), ("64KiB", 65536),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["lots", "12 parsecs", "-3GiB", "GiB", ""])
def test_parse_bytes_rejects_with_fix(bad):
    with pytest.raises(InputError) as e:
        parse_bytes(bad, "GPU budget")
    assert "GPU budget" in e.value.what and "24GiB" in e.value.fix


def test_format_bytes():
    assert format_bytes(25.3 * 2**30) == "25.3 GiB"
    assert format_bytes(512 * 2**20) == "512 MiB"
    assert format_bytes(17) == "17 B"


def test_dtypes():
    assert canonical_dtype("fp16") == canonical_dtype(torch.float16) == "float16"
    assert canonical_dtype("bf16") == "bfloat16" and canonical_dtype("f32") == "float32"
    with pytest.raises(InputError, match="unknown weight dtype"):
        canonical_dtype("float8")
    assert row_bytes(64, "q4_0") == 2 * 18 and row_bytes(64, "q8_0") == 2 * 34
    with pytest.raises(InputError, match="blocks of 32"):
        row_bytes(48, "q4_0")
    assert small_dtype("q4_0") == "float32" and small_dtype("bf16") == "bfloat16"
    assert default_kv_dtype("q8_0") == "float16"


def test_neuron_bytes_70b():
    nb = neuron_bytes(SHAPES["llama2-70b"], "float16")
    assert (nb.gate, nb.up, nb.down, nb.total) == (16384, 16384, 16384, 49152)


@pytest.mark.parametrize("name", ["llama2-70b", "llama3-70b", "smollm2-135m", "tiny"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_all_weights_equal_parameter_count(name, dtype):
    """Dense tensors + every neuron, hot or cold, is exactly the model's parameters in the dtype."""
    cfg = SHAPES[name]
    width = 4 if dtype == "float32" else 2
    for split in (0, cfg.n_ff // 3, cfg.n_ff):
        acct = placement_bytes(cfg, [split] * cfg.n_layers, dtype, ctx_len=16)
        weights = acct.gpu_total + acct.cpu_total - sum(acct.gpu[k] for k in ("kv_cache", "predictors", "buffers")) \
            - acct.cpu["buffers"]
        assert weights == cfg.n_params * width


@pytest.mark.parametrize("variant", [{}, {"qkv_bias": True}, {"tie_embeddings": True}])
def test_matches_real_tensors(variant):
    """Bytes per component equal the sizes of a real (random) model's tensors, split hot/cold."""
    from hotcold.model.random import RandomSource

    cfg = shape("tiny", **variant)
    tensors = RandomSource(cfg, seed=0).materialize()
    size = {k: v.to(torch.float16).numel() * 2 for k, v in tensors.items()}
    d = dense_bytes(cfg, "float16")
    for i in range(cfg.n_layers):
        attn = sum(size[f"layers.{i}.{t}"] for t in ("wq", "wk", "wv", "wo", "bq", "bk", "bv") if f"layers.{i}.{t}" in size)
        assert attn == d.attention_per_layer
        assert size[f"layers.{i}.attn_norm"] + size[f"layers.{i}.ffn_norm"] == d.norms_per_layer
    assert size["tok_embeddings"] == d.embedding
    assert size.get("output", 0) == d.lm_head
    assert size["norm"] == d.final_norm
    # per neuron: one gate row, one up row, one down column
    nb = neuron_bytes(cfg, "float16")
    w_gate, w_down = tensors["layers.0.w_gate"], tensors["layers.0.w_down"]
    assert w_gate[0].numel() * 2 == nb.gate and w_down[:, 0].numel() * 2 == nb.down
    hot = [5, 0, cfg.n_ff, 100]
    acct = placement_bytes(cfg, hot, "float16", ctx_len=8)
    ffn = sum(size[f"layers.{i}.{t}"] for i in range(cfg.n_layers) for t in ("w_gate", "w_up", "w_down"))
    assert acct.gpu["ffn_hot"] + acct.cpu["ffn_cold"] == ffn
    assert acct.ffn_gpu_per_layer == [k * nb.total for k in hot]


def test_kv_cache_and_predictor_by_hand():
    cfg = SHAPES["llama2-70b"]
    # 2 (K and V) × 80 layers × 8 KV heads × 128 × 4096 tokens × 2 bytes
    assert kv_cache_bytes(cfg, 4096, "float16") == 2 * 80 * 8 * 128 * 4096 * 2
    assert default_predictor_rank(cfg) == 1024
    assert predictor_bytes(cfg, 1024, "float16") == 2 * (8192 * 1024 + 1024 + 28672 * 1024 + 28672)
    with pytest.raises(InputError, match="context length"):
        kv_cache_bytes(cfg, 0, "float16")


def test_placement_bytes_components():
    cfg = SHAPES["smollm2-135m"]
    a = placement_bytes(cfg, [100] * cfg.n_layers, "bf16", ctx_len=1024, cold_mode="predictor", predictor_rank=64)
    assert a.gpu["predictors"] == cfg.n_layers * predictor_bytes(cfg, 64, "bf16")
    assert a.gpu["kv_cache"] == kv_cache_bytes(cfg, 1024, "bfloat16")
    assert a.gpu["buffers"] == buffer_bytes(cfg, 1024).gpu and a.cpu["buffers"] == buffer_bytes(cfg, 1024).cpu
    assert a.gpu["lm_head"] == 0  # tied
    assert a.gpu_fixed == a.gpu_total - a.gpu["ffn_hot"]
    t = placement_bytes(cfg, [100] * cfg.n_layers, "bf16", ctx_len=1024)
    assert t.gpu["predictors"] == 0
    with pytest.raises(InputError, match="cold-neuron mode"):
        placement_bytes(cfg, [0] * cfg.n_layers, "bf16", ctx_len=8, cold_mode="guess")
    with pytest.raises(InputError, match="entries"):
        placement_bytes(cfg, [0], "bf16", ctx_len=8)


def test_tensor_bytes():
    assert tensor_bytes((3, 64), "float32") == 768
    assert tensor_bytes((2, 3, 64), "q8_0") == 6 * 68
    assert tensor_bytes((), "float16") == 2


def test_per_layer_predictor_ranks_are_counted():
    from hotcold.memory import placement_bytes, predictor_bytes
    from hotcold.model.config import shape

    cfg = shape("tiny", n_layers=3)
    ranks = [8, 16, 0]
    base = placement_bytes(cfg, [10, 10, 10], "float32", ctx_len=64)
    acct = placement_bytes(cfg, [10, 10, 10], "float32", ctx_len=64, predictor_rank=ranks, predictor_dtype="float16")
    assert base.gpu["predictors"] == 0
    assert acct.gpu["predictors"] == sum(predictor_bytes(cfg, r, "float16") for r in ranks) > 0
    assert acct.gpu_total - base.gpu_total == acct.gpu["predictors"]
    one = placement_bytes(cfg, [10, 10, 10], "float32", ctx_len=64, cold_mode="predictor", predictor_rank=8)
    assert one.gpu["predictors"] == 3 * predictor_bytes(cfg, 8, "float32")
    import pytest

    from hotcold.errors import InputError

    with pytest.raises(InputError, match="one rank per layer"):
        placement_bytes(cfg, [10, 10, 10], "float32", ctx_len=64, predictor_rank=[8, 8])
