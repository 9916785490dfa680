"""Truth: our GGUF loader, tokenizer and dense model against transformers on the real SmolLM2-135M."""

from __future__ import annotations

import json

import pytest
import torch

from hotcold.model.generate import generate

pytestmark = pytest.mark.smollm

PROMPT = ("Write a python function to find the first repeated character in a given string. Your code should "
          "pass these tests:\n\nassert first_repeated_char(\"abcabc\") == \"a\"\nassert first_repeated_char(\"abc\") == None\n"
          "assert first_repeated_char(\"123123\") == \"1\"")


@pytest.fixture(scope="module")
def hf_model(smollm_path):
    transformers = pytest.importorskip("transformers")
    m = transformers.AutoModelForCausalLM.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name,
                                                          torch_dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="module")
def hf_tokenizer(smollm_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)


def test_config_read_from_gguf(smollm_source):
    c = smollm_source.config
    assert (c.n_layers, c.dim, c.n_ff, c.n_heads, c.n_kv_heads, c.vocab_size, c.head_dim) == (30, 576, 1536, 9, 3, 49152, 64)
    assert c.tie_embeddings and c.eos_token_ids == (2,)


def test_logits_and_greedy_match_transformers(smollm_source, smollm_dense, hf_model):
    tok = smollm_source.tokenizer()
    ids = tok.chat_ids(PROMPT)
    assert len(ids) >= 60
    x = torch.tensor([ids])
    mine = smollm_dense.forward(x)
    with torch.no_grad():
        ref = hf_model(x).logits
    assert (mine - ref).abs().max().item() <= 1e-3
    g = generate(smollm_dense, ids, 60)
    with torch.no_grad():
        ref_out = hf_model.generate(x, max_new_tokens=60, do_sample=False, eos_token_id=None,
                                    attention_mask=torch.ones_like(x))
    assert g.new_ids == ref_out[0, len(ids):].tolist()


def test_kv_cache_equals_full_reforward(smollm_dense):
    toks = torch.randint(3, 49152, (1, 40), generator=torch.Generator().manual_seed(0))
    full = smollm_dense.forward(toks)
    cache = smollm_dense.new_cache(1, 40)
    step = [smollm_dense.forward(toks[:, :30], 0, cache)]
    step += [smollm_dense.forward(toks[:, t:t + 1], t, cache) for t in range(30, 40)]
    assert (torch.cat(step, 1) - full).abs().max().item() < 1e-3


def test_tokenizer_matches_transformers(smollm_source, hf_tokenizer, mbpp_path):
    tok = smollm_source.tokenizer()
    texts = [json.loads(line)["code"] for line in mbpp_path.read_text().splitlines()[:40]]
    texts += [json.loads(line)["text"] for line in mbpp_path.read_text().splitlines()[:40]]
    texts += ["x = 12345 + 6.78e-9  # ünïcödé ☃\n\ttabs   and  spaces\r\n", "<|im_start|>user\nhi<|im_end|>"]
    for t in texts:
        assert tok.encode(t) == hf_tokenizer(t, add_special_tokens=False).input_ids, t
        assert tok.decode(tok.encode(t), skip_special=False) == t


def test_chat_template_matches_transformers(smollm_source, hf_tokenizer):
    msgs = [{"role": "user", "content": "Write a function."}]
    ours = smollm_source.tokenizer().render_chat(msgs)
    ref = hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours == ref
