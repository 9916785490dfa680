"""Write small GGUF files the way llama.cpp's converter does (Q/K rows permuted), for loader tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hotcold.model.gguf_loader import gguf_name
from hotcold.model.weights import WeightSource


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what byte-level BPE vocabularies are written in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_bpe_vocab(size: int) -> tuple[list[str], list[str], list[int]]:
    """Special tokens, the 256 byte tokens, then merges of frequent English pairs up to `size`."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    byte_tokens = list(bytes_to_unicode().values())
    tokens = specials + byte_tokens
    merges: list[str] = []
    letters = "etaoinshrdlcumwfgypbvk"
    sp = bytes_to_unicode()[ord(" ")]
    candidates = [(sp, c) for c in letters] + [(a, b) for a in letters for b in letters]
    for a, b in candidates:
        if len(tokens) >= size:
            break
        tokens.append(a + b)
        merges.append(f"{a} {b}")
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    return tokens, merges, types


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's permute: HF half-split rows -> interleaved rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(src: WeightSource, path: Path, qtypes: dict[str, object] | None = None, arch: str = "llama",
               chat_template: str | None = None) -> Path:
    """Write `src` as a GGUF. qtypes maps a tensor leaf name (w_gate, wq, ...) to a GGMLQuantizationType."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    cfg = src.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layers)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_context_length(cfg.max_seq_len)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    tokens, merges, types = tiny_bpe_vocab(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)
    for name in src.names():
        arr = src.get(name).numpy().astype(np.float32)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "wq":
            arr = permute_qk(arr, cfg.n_heads)
        elif leaf == "wk":
            arr = permute_qk(arr, cfg.n_kv_heads)
        qt = (qtypes or {}).get(leaf, Q.F32)
        if arr.ndim == 1 or qt == Q.F32:
            w.add_tensor(gguf_name(name), arr)
        elif qt in (Q.Q4_K, Q.Q6_K):
            w.add_tensor(gguf_name(name), k_quant_blocks(arr.shape, qt), raw_dtype=qt)  # uint8: shape read as bytes
        elif qt == Q.BF16:  # the writer reads a uint8 array's shape as bytes; BF16 is 2 bytes a value
            w.add_tensor(gguf_name(name), quantize(arr, qt).view(np.uint16), raw_shape=arr.shape, raw_dtype=qt)
        else:
            w.add_tensor(gguf_name(name), quantize(arr, qt), raw_dtype=qt)  # uint8: shape read as bytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def k_quant_blocks(shape: tuple[int, ...], qt) -> np.ndarray:
    """Random but valid K-quant blocks (gguf can dequantize K-quants, not quantize them)."""
    from gguf.constants import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    block, nbytes = GGML_QUANT_SIZES[qt]
    rows, cols = shape
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    if qt == Q.Q4_K:  # d, dmin (f16) lead the block
        raw[..., 0:2] = scale
        raw[..., 2:4] = scale
    else:  # Q6_K: d (f16) ends the block
        raw[..., -2:] = scale
    return raw.reshape(rows, -1)
