"""Read Hugging Face model directories (LlamaForCausalLM-style; Qwen2's QKV biases too).

Tensors are read lazily from memory-mapped safetensors files (single or sharded with an index);
pickled checkpoints (`*.bin`) are refused.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from hotcold.errors import InputError
from hotcold.model.config import ModelConfig, RopeScaling
from hotcold.model.weights import WeightSource

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

# our name -> HF name ({i} = layer)
NAME_TABLE = {
    "tok_embeddings": "model.embed_tokens.weight",
    "norm": "model.norm.weight",
    "output": "lm_head.weight",
    "layers.{i}.attn_norm": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.wq": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.wk": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.wv": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.wo": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.bq": "model.layers.{i}.self_attn.q_proj.bias",
    "layers.{i}.bk": "model.layers.{i}.self_attn.k_proj.bias",
    "layers.{i}.bv": "model.layers.{i}.self_attn.v_proj.bias",
    "layers.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.w_gate": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.w_up": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.w_down": "model.layers.{i}.mlp.down_proj.weight",
}


def hf_name(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "layers":
        return NAME_TABLE[f"layers.{{i}}.{parts[2]}"].format(i=parts[1])
    return NAME_TABLE[name]


def config_from_hf(c: dict[str, Any], where: str) -> ModelConfig:
    arch = (c.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED:
        raise InputError(f"{where}: architecture {arch!r} is not supported", f"hotcold reads {', '.join(SUPPORTED)}")
    act = c.get("hidden_act", "silu")
    if act not in ("silu", "relu"):
        raise InputError(f"{where}: hidden_act {act!r} is not supported", "hotcold reads SwiGLU (silu) and ReGLU (relu) FFNs")
    rs = c.get("rope_scaling") or None
    scaling = None
    if rs and rs.get("rope_type", rs.get("type")) == "llama3":
        scaling = RopeScaling(factor=float(rs["factor"]), low_freq_factor=float(rs["low_freq_factor"]),
                              high_freq_factor=float(rs["high_freq_factor"]),
                              original_max_position_embeddings=int(rs["original_max_position_embeddings"]))
    elif rs:
        raise InputError(f"{where}: rope_scaling {rs} is not supported", "hotcold supports llama3-style scaling")
    eos = c.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    n_heads = int(c["num_attention_heads"])
    return ModelConfig(
        n_layers=int(c["num_hidden_layers"]), dim=int(c["hidden_size"]), n_ff=int(c["intermediate_size"]),
        n_heads=n_heads, n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
        vocab_size=int(c["vocab_size"]), head_dim=int(c.get("head_dim") or 0),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)), rope_theta=float(c.get("rope_theta", 10000.0)),
        rope_scaling=scaling, max_seq_len=int(c.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=arch == "Qwen2ForCausalLM" or bool(c.get("attention_bias", False)),
        activation=act, bos_token_id=c.get("bos_token_id"), eos_token_ids=eos_ids,
        name=str(c.get("_name_or_path") or arch))


class HFSource(WeightSource):
    def __init__(self, d: str | Path):
        self.dir = Path(d)
        cfg_path = self.dir / "config.json"
        if not cfg_path.is_file():
            raise InputError(f"{self.dir} has no config.json, so it is not a Hugging Face model directory",
                             "pass the directory that holds config.json and *.safetensors, or a .gguf file")
        try:
            self.hf_config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{cfg_path} is not valid JSON ({e})", "fix or re-download config.json") from None
        try:
            self.config = config_from_hf(self.hf_config, str(cfg_path))
        except KeyError as e:
            raise InputError(f"{cfg_path} lacks {e}", "the config is incomplete; re-download it") from None
        self.description = f"hf:{self.dir}"
        self.index = self._index()
        if not self.config.tie_embeddings and "lm_head.weight" not in self.index:
            self.config = self.config.replace(tie_embeddings=True)
        missing = [hf_name(n) for n in self.names() if hf_name(n) not in self.index]
        if missing:
            raise InputError(f"{self.dir} lacks tensors {missing[:3]}{'...' if len(missing) > 3 else ''}",
                             "the checkpoint is incomplete; re-download it")
        self._handles: dict[str, Any] = {}

    def _index(self) -> dict[str, str]:
        """HF tensor name -> safetensors file name."""
        from safetensors import safe_open

        idx = self.dir / "model.safetensors.index.json"
        if idx.is_file():
            return dict(json.loads(idx.read_text())["weight_map"])
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            pickled = sorted(self.dir.glob("*.bin")) + sorted(self.dir.glob("*.pt"))
            hint = " (it has pickled *.bin files, which hotcold never loads)" if pickled else ""
            raise InputError(f"{self.dir} has no *.safetensors weights{hint}",
                             "convert the checkpoint to safetensors")
        out: dict[str, str] = {}
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as h:
                    out.update({k: f.name for k in h.keys()})
            except Exception as e:  # safetensors raises its own error types on corrupt headers
                raise InputError(f"{f} is not a readable safetensors file ({e})", "re-download it") from None
        return out

    def _handle(self, fname: str) -> Any:
        from safetensors import safe_open

        if fname not in self._handles:
            self._handles[fname] = safe_open(str(self.dir / fname), framework="pt")
        return self._handles[fname]

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        key = hf_name(name)
        return self._handle(self.index[key]).get_tensor(key).to(dtype)

    @cached_property
    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(self.config.shape_key(), sort_keys=True).encode())
        for f in sorted(set(self.index.values())):
            p = self.dir / f
            size = p.stat().st_size
            h.update(f"{f}:{size}".encode())
            with open(p, "rb") as fh:
                h.update(fh.read(1 << 20))
                fh.seek(max(0, size - (1 << 20)))
                h.update(fh.read(1 << 20))
        return h.hexdigest()[:32]

    def tokenizer(self):
        from hotcold.model.tokenizer import Tokenizer

        return Tokenizer.from_hf_dir(self.dir, self.config.eos_token_ids)
