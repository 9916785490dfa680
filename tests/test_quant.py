"""The quantized format (hotcold.quant) against gguf's own blocks, and the quantized cold kernel
(hotcold.runtime.qkernels) against a float64 reference, at toy shapes; one real SmolLM2 tensor for truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gg_dequantize
from gguf.quants import quantize as gg_quantize

from hotcold import memory, quant
from hotcold.errors import InputError
from hotcold.quant import KEPT, QUANTIZED, REQUANTIZED, QFormat

Q4, Q8, Q4A, Q8A = QFormat(4), QFormat(8), QFormat(4, 32, True), QFormat(8, 32, True)


def _w(rows, cols, seed=0, scale=1.0):
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32) * scale


# ---- bytes -------------------------------------------------------------------------------------
def test_row_bytes_match_gguf_blocks_and_the_memory_account():
    assert quant.row_bytes(32, 4) == 18 and quant.row_bytes(32, 8) == 34  # Q4_0, Q8_0 blocks
    assert quant.row_bytes(32, 4, asym=True) == 20  # Q4_1
    assert quant.row_bytes(8192, 4, 128) == 4096 + 128
    for d in (576, 8192):
        assert quant.row_bytes(d, 4) == memory.row_bytes(d, "q4_0")
        assert quant.row_bytes(d, 8) == memory.row_bytes(d, "q8_0")
    qt = quant.quantize(torch.from_numpy(_w(5, 96)), 4, 32, True)
    assert qt.nbytes == qt.packed.numel() == 5 * quant.row_bytes(96, 4, 32, True)
    assert quant.neuron_bytes(576, Q4) == 3 * 324
    assert QFormat(4).bits_per_weight == 4.5 and QFormat(8, 64, True).bits_per_weight == 8.5


def test_parse_format():
    assert quant.parse_format("q4") == Q4 and quant.parse_format("Q8_0") == Q8
    assert quant.parse_format("q4_1") == Q4A and quant.parse_format("q8a_g64") == QFormat(8, 64, True)
    assert quant.parse_format("q4_g128") == QFormat(4, 128) and quant.parse_format(Q4.name) == Q4
    assert quant.parse_format("float16") is None
    with pytest.raises(InputError, match="unknown quantized dtype"):
        quant.parse_format("q5")


@pytest.mark.parametrize("kind,fmt", [(Q.Q4_0, Q4), (Q.Q8_0, Q8), (Q.Q4_1, Q4A)])
def test_quantize_is_llama_cpp_bit_for_bit(kind, fmt):
    """Our quantize of float weights gives gguf's reference blocks (rearranged), and dequantize its values."""
    w = _w(9, 160, seed=int(kind))
    w[3, :32] = 0.0  # an all-zero group: scale 0
    raw = gg_quantize(w, kind)
    ours = quant.quantize(torch.from_numpy(w), fmt.bits, fmt.group, fmt.asym)
    kept, how = quant.from_gguf(raw, kind, w.shape, fmt)
    assert how == KEPT
    assert torch.equal(ours.packed, kept.packed)
    assert np.array_equal(quant.dequantize(ours).numpy(), gg_dequantize(raw, kind))


def test_q4_0_nibble_order():
    """Byte i of a group holds value i (low nibble) and value i + 16 (high nibble), as in Q4_0."""
    codes = np.arange(32) % 16  # value k has code k % 16
    d = np.float16(0.5)
    block = np.concatenate([np.frombuffer(d.tobytes(), np.uint8),
                            (codes[:16] | (codes[16:] << 4)).astype(np.uint8)])[None, :]
    ref = gg_dequantize(block, Q.Q4_0)
    assert np.array_equal(ref[0], 0.5 * (codes - 8))
    qt, how = quant.from_gguf(block, Q.Q4_0, (1, 32), Q4)
    assert how == KEPT
    assert np.array_equal(qt.data.numpy()[0], block[0, 2:])
    assert np.array_equal(quant.dequantize(qt).numpy(), ref)


@pytest.mark.parametrize("kind", [Q.Q4_0, Q.Q8_0, Q.Q4_1])
@pytest.mark.parametrize("fmt", [Q4, Q8, Q4A, Q8A, QFormat(4, 64)])
def test_gguf_conversions_keep_what_the_layout_allows(kind, fmt):
    w = _w(6, 128, seed=3)
    raw = gg_quantize(w, kind)
    ref = gg_dequantize(raw, kind)
    qt, how = quant.from_gguf(raw, kind, w.shape, fmt)
    assert how == quant.gguf_provenance(kind, fmt)
    assert qt.fmt == fmt and qt.shape == (6, 128)
    expect_kept = fmt.group == 32 and {Q.Q4_0: True, Q.Q8_0: fmt.bits == 8, Q.Q4_1: fmt.asym}[kind]
    assert (how == KEPT) == expect_kept
    got = quant.dequantize(qt).numpy()
    if how == KEPT:
        assert np.array_equal(got, ref)
    else:  # re-quantized: within one quantization step of the source values
        step = np.abs(ref).max() / (7 if fmt.bits == 4 else 127)
        assert np.abs(got - ref).max() <= step


def _random_kquant(kind, rows, cols, seed=0):
    """Random bytes of a K-quant / Q5_0 tensor with its float16 super-scales set to a sane value."""
    blk, size = {Q.Q4_K: (256, 144), Q.Q6_K: (256, 210), Q.Q5_0: (32, 22)}[kind]
    raw = np.random.default_rng(seed).integers(0, 256, (rows, cols // blk, size), dtype=np.uint8)
    d = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    if kind == Q.Q6_K:
        raw[:, :, -2:] = d  # d at the block's end
    else:
        raw[:, :, 0:2] = d
        if kind == Q.Q4_K:
            raw[:, :, 2:4] = d  # dmin
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", [Q.Q4_K, Q.Q6_K, Q.Q5_0])
def test_k_quants_are_dequantized_then_requantized(kind):
    raw = _random_kquant(kind, 4, 512)
    ref = gg_dequantize(raw, kind)
    qt, how = quant.from_gguf(raw, kind, (4, 512), Q4)
    assert how == REQUANTIZED == quant.gguf_provenance(kind, Q4)
    err = np.abs(quant.dequantize(qt).numpy() - ref)
    assert err.max() <= np.abs(ref).max() / 7


def test_float_sources_and_transposed_tensors():
    w = _w(64, 96, seed=5)
    for kind, raw in ((Q.F32, w), (Q.F16, w.astype(np.float16))):
        qt, how = quant.from_gguf(raw, kind, w.shape, Q8)
        assert how == QUANTIZED
        assert torch.equal(qt.packed, quant.quantize(torch.from_numpy(raw.astype(np.float32)), 8).packed)
    raw = gg_quantize(w, Q.Q4_0)
    qt, how = quant.from_gguf(raw, Q.Q4_0, w.shape, Q4, transpose=True)  # the down projection, by neuron
    assert how == REQUANTIZED and qt.shape == (96, 64)
    assert torch.equal(qt.packed, quant.quantize(torch.from_numpy(np.ascontiguousarray(
        gg_dequantize(raw, Q.Q4_0).T)), 4).packed)


def test_requantizing_a_q4_0_tensor_changes_nothing():
    qt = quant.quantize(torch.from_numpy(_w(8, 256, seed=7)), 4)
    again = quant.quantize(quant.dequantize(qt), 4)
    assert torch.equal(again.packed, qt.packed)


@pytest.mark.parametrize("fmt", [Q4, Q8, Q4A, Q8A, QFormat(4, 128), QFormat(8, 4)])
def test_roundtrip_error_is_within_half_a_step(fmt):
    w = torch.from_numpy(_w(16, 256, seed=11))
    qt = quant.quantize(w, fmt.bits, fmt.group, fmt.asym)
    err = (quant.dequantize(qt) - w).abs().reshape(16, -1, fmt.group)
    d = qt.scales.float().abs().reshape(16, -1, 1)
    # half a step, plus Q4_0's clipped top code (a full step) and the offset's float16 rounding
    slack = 1.0 if (fmt.bits == 4 and not fmt.asym) else 0.5
    bound = d * slack + 1e-3 * w.abs().reshape(16, -1, fmt.group).amax(-1, keepdim=True)
    assert bool((err <= bound + 1e-6).all())


def test_rows_are_byte_ranges():
    w = torch.from_numpy(_w(10, 64, seed=2))
    qt = quant.quantize(w, 4, 32, True)
    full = quant.dequantize(qt)
    assert torch.equal(quant.dequantize(qt.rows(3, 7)), full[3:7])
    idx = [9, 0, 4]
    assert torch.equal(quant.dequantize(qt.take_rows(idx)), full[idx])
    # migrating row 4 into slot 1 of another tensor is a copy of one byte range
    other = quant.quantize(torch.zeros(3, 64), 4, 32, True)
    lo, hi = qt.row_range(4)
    dst = other.packed.view(-1)
    o_lo, o_hi = other.row_range(1)
    dst[o_lo:o_hi] = qt.packed.reshape(-1)[lo:hi]
    assert torch.equal(quant.dequantize(other)[1], full[4])
    # views: data, scales and offsets are the packed bytes
    assert qt.data.shape == (10, 32) and qt.scales.shape == (10, 2) and qt.offsets.shape == (10, 2)
    rebuilt = quant.QTensor.from_parts(qt.data, qt.scales, qt.fmt, qt.shape, qt.offsets)
    assert torch.equal(rebuilt.packed, qt.packed)
    back = quant.QTensor.from_packed(qt.packed.clone(), qt.meta())
    assert torch.equal(back.packed, qt.packed) and back.fmt == qt.fmt


def test_hcat_and_qk_unpermutation_are_exact():
    from hotcold.model.gguf_loader import unpermute_qk

    up, down = (quant.quantize(torch.from_numpy(_w(6, 64, seed=s)), 8, 32, True) for s in (1, 2))
    ud = quant.hcat(up, down)
    assert ud.shape == (6, 128)
    assert torch.equal(quant.dequantize(ud), torch.cat([quant.dequantize(up), quant.dequantize(down)], 1))
    wq = _w(16, 64, seed=4)
    qt = quant.quantize(torch.from_numpy(wq), 4)
    perm = unpermute_qk(np.arange(16), 2)  # GGUF's Q rows permuted for RoPE: undone as a row gather
    assert torch.equal(quant.dequantize(qt.take_rows(perm)),
                       torch.from_numpy(unpermute_qk(quant.dequantize(qt).numpy(), 2)))


def test_bad_input_is_one_clear_error():
    with pytest.raises(InputError, match="groups of 32"):
        quant.quantize(torch.zeros(2, 48), 4)
    with pytest.raises(InputError, match="multiple of 4"):
        quant.quantize(torch.zeros(2, 48), 4, 6)
    with pytest.raises(InputError, match="4 or 8 bits"):
        quant.quantize(torch.zeros(2, 64), 3)
    with pytest.raises(InputError, match="only matrices"):
        quant.quantize(torch.zeros(64), 4)
    w = torch.zeros(2, 64)
    w[1, 5] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        quant.quantize(w, 8, name="blk.0.ffn_up.weight")
    qt = quant.quantize(torch.zeros(2, 64), 4)
    with pytest.raises(InputError, match="manifest disagree"):
        quant.QTensor.from_packed(qt.packed, {**qt.meta(), "bits": 8})


def test_random_qtensor_has_the_requested_spread():
    for fmt in (Q4, Q8A):
        qt = quant.random_qtensor(256, 512, fmt, std=0.02, seed=1)
        assert 0.017 < float(quant.dequantize(qt).std()) < 0.023


def test_smollm2_q4_1_tensors_are_kept_exactly(smollm_source):
    """The real SmolLM2 GGUF (Q4_1 FFN, Q8_0 embedding) converts without re-quantizing."""
    r = smollm_source.reader
    for name, fmt in (("blk.0.ffn_gate.weight", Q4A), ("token_embd.weight", Q8)):
        t = next(t for t in r.tensors if t.name == name)
        qt, how = quant.from_gguf_tensor(t, fmt)
        assert how == KEPT
        ref = gg_dequantize(np.asarray(t.data), t.tensor_type).reshape(qt.shape)
        assert np.array_equal(quant.dequantize(qt).numpy(), ref)
    down = next(t for t in r.tensors if t.name == "blk.0.ffn_down.weight")
    qt, how = quant.from_gguf_tensor(down, Q4A, transpose=True)
    assert how == REQUANTIZED and qt.shape == (1536, 576)


# ---- the cold kernel ---------------------------------------------------------------------------
def _layer(fmt, C=45, D=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = quant.quantize(torch.randn(C, D, generator=g) * 0.2, fmt.bits, fmt.group, fmt.asym)
    ud = quant.hcat(quant.quantize(torch.randn(C, D, generator=g) * 0.2, fmt.bits, fmt.group, fmt.asym),
                    quant.quantize(torch.randn(C, D, generator=g) * 0.2, fmt.bits, fmt.group, fmt.asym))
    x = torch.randn(D, generator=g)
    return gate, ud, x


def _reference(gate, ud, x, mode, mask=None):
    """float64 over the dequantized rows: (y, active, threshold between the active and inactive |s|)."""
    D = x.shape[0]
    G, U, xd = quant.dequantize(gate).double(), quant.dequantize(ud).double(), x.double()
    s = torch.nn.functional.silu(G @ xd)
    mag = s.abs().sort().values
    C = mag.numel()
    # a threshold in the widest gap around the middle, so float32 and float64 agree on who is active
    lo, hi = C // 4, 3 * C // 4
    i = lo + int(torch.argmax(mag[lo + 1: hi + 1] - mag[lo:hi]))
    thr = float((mag[i] + mag[i + 1]) / 2)
    if mode == "exact":
        act = torch.ones(C, dtype=torch.bool)
    elif mode == "threshold":
        act = s.abs() > thr
    else:
        act = mask.bool()
    y = ((s * act) * (U[:, :D] @ xd)) @ U[:, D:]
    return y, act, thr


FORMATS = [Q4, Q8, Q4A, QFormat(8, 64, True)]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_cold_kernel_against_float64(fmt):
    from hotcold.runtime.qkernels import QColdKernel, bytes_read

    gate, ud, x = _layer(fmt, seed=fmt.bits + fmt.group)
    C, D = gate.shape
    mask = (torch.rand(C, generator=torch.Generator().manual_seed(1)) < 0.4).to(torch.uint8)
    for mode in ("exact", "threshold", "predictor"):
        ref, act, thr = _reference(gate, ud, x, mode, mask)
        for group in (1, 2, 4):
            for dynamic in (False, True):
                k = QColdKernel(D, backend="numba", group=group, dynamic=dynamic)
                active = mask.clone() if mode == "predictor" else torch.zeros(C, dtype=torch.uint8)
                counts = np.zeros(C, dtype=np.float32)
                r = k(x, gate, ud, mode, mask=mask, thr=thr, active=active, counts=counts)
                err = float((r.y.double() - ref).norm() / ref.norm())
                assert err < 2e-6, (mode, group, dynamic, err)
                assert r.n_active == int(act.sum())
                assert torch.equal(active.bool(), act)
                assert np.array_equal(counts, act.numpy().astype(np.float32))
                assert r.bytes_read == bytes_read(gate, ud, mode, r.n_active)
    # exact mode is static: reproducible to the bit
    k = QColdKernel(D, backend="numba", group=4, dynamic=True)
    assert torch.equal(k(x, gate, ud, "exact").y.clone(), k(x, gate, ud, "exact").y)


def test_avx512_q4_predictor_kernel_against_float64_and_numba():
    """hotcold.runtime.cq4 (predictor mode, symmetric INT4, group 32) where it builds: the float64 reference,
    the numba kernel's result, counts and the slot count, on 1 and 2 threads, an empty and a full mask."""
    from hotcold.runtime import cq4
    from hotcold.runtime.qkernels import QColdKernel

    if cq4.load() is None:
        pytest.skip("no AVX-512 F/BW or no C compiler on this machine: predictor mode runs the numba kernel")
    for C, D, p in ((5, 32, 1.0), (33, 96, 0.4), (300, 1024, 0.3), (40, 64, 0.0)):
        gate, ud, x = _layer(Q4, C=C, D=D, seed=C)
        mask = (torch.rand(C, generator=torch.Generator().manual_seed(2)) < p).to(torch.uint8)
        ref, act, _ = _reference(gate, ud, x, "predictor", mask)
        k = QColdKernel(D, backend="numba")
        assert k.name == "numba+avx512-q4"
        slow = QColdKernel(D, backend="numba")
        slow._q4 = None
        want = slow(x, gate, ud, "predictor", mask=mask).y.clone()
        for threads in (1, 2):
            k._q4.threads = threads
            counts = np.zeros(C, dtype=np.float32)
            r = k(x, gate, ud, "predictor", mask=mask, counts=counts)
            assert r.n_active == int(act.sum()) and np.array_equal(counts, act.numpy().astype(np.float32))
            if act.any():
                assert float((r.y.double() - ref).norm() / ref.norm()) < 2e-6, (C, D, threads)
                assert float((r.y - want).norm() / want.norm()) < 2e-6
            else:
                assert torch.count_nonzero(r.y) == 0


def test_cold_kernel_matches_the_float_kernel_on_dequantized_rows():
    """Exact mode on quantized rows = the fp32 cold kernel on the same dequantized weights."""
    from hotcold.runtime.coldkernel import ColdKernel
    from hotcold.runtime.qkernels import QColdKernel

    gate, ud, x = _layer(Q4, C=33, D=96, seed=4)
    q = QColdKernel(96, backend="numba", group=4).__call__(x, gate, ud, "exact").y.clone()
    f = ColdKernel(96, backend="torch")(x, quant.dequantize(gate), quant.dequantize(ud), "exact").y
    assert float((q - f).norm() / f.norm()) < 1e-5


def test_torch_fallback_and_bad_layouts():
    from hotcold.runtime.qkernels import QColdKernel

    gate, ud, x = _layer(Q8, C=20, D=64, seed=9)
    ref, act, thr = _reference(gate, ud, x, "threshold")
    k = QColdKernel(64, backend="torch")
    r = k(x, gate, ud, "threshold", thr=thr)
    assert float((r.y.double() - ref).norm() / ref.norm()) < 2e-6 and r.n_active == int(act.sum())
    other = quant.quantize(torch.zeros(20, 128), 4)
    with pytest.raises(InputError, match="do not fit together"):
        k(x, gate, other, "exact")
    with pytest.raises(InputError, match="group 3"):
        QColdKernel(64, backend="torch", group=3)
