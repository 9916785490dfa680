"""Logit metrics: agreement, KL(dense || other), perplexity, teacher-forced NLL through a callable."""

from __future__ import annotations

import math

import pytest
import torch

from hotcold.quality.metrics import (
    NLL,
    compare_logits,
    kl_divergence,
    next_token_agreement,
    nll,
    perplexity,
    teacher_forced_nll,
)


def test_identical_logits():
    x = torch.randn(7, 50, generator=torch.Generator().manual_seed(0))
    assert next_token_agreement(x, x) == 1.0
    assert kl_divergence(x, x) == pytest.approx(0.0, abs=1e-12)
    c = compare_logits(x, x.clone())
    assert c.positions == 7 and c.agreement == 1.0 and c.kl_max == pytest.approx(0.0, abs=1e-12)


def test_agreement_counts_argmax_matches():
    dense = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 5.0], [0.0, 0.0, 1.0]])
    other = torch.tensor([[2.0, 1.0, 0.0], [3.0, 2.0, 1.0], [1.0, 0.0, 5.0], [9.0, 0.0, 1.0]])
    assert next_token_agreement(dense, other) == 0.5
    assert next_token_agreement(dense[None], other[None]) == 0.5  # [1, T, V] accepted


def test_kl_matches_the_definition_and_direction():
    g = torch.Generator().manual_seed(1)
    p_logits, q_logits = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    p, q = p_logits.double().softmax(-1), q_logits.double().softmax(-1)
    by_hand = (p * (p / q).log()).sum(-1)
    got = kl_divergence(p_logits, q_logits, reduction="none")
    assert torch.allclose(got, by_hand, atol=1e-12)
    assert kl_divergence(p_logits, q_logits) == pytest.approx(by_hand.mean().item())
    assert kl_divergence(p_logits, q_logits, reduction="max") == pytest.approx(by_hand.max().item())
    # KL is not symmetric: the dense model's distribution is the reference
    assert kl_divergence(q_logits, p_logits) != pytest.approx(kl_divergence(p_logits, q_logits))
    # invariant to a per-row shift of the logits, fine in bf16/fp16 inputs too
    assert kl_divergence(p_logits + 100.0, q_logits.half()) == pytest.approx(
        kl_divergence(p_logits, q_logits.half().float()), rel=1e-6)


def test_shape_errors():
    with pytest.raises(ValueError, match="differ"):
        kl_divergence(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"\[T, vocab\]"):
        next_token_agreement(torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="reduction"):
        kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3), reduction="sum")


def test_perplexity_uniform_and_perfect():
    v = 32
    assert perplexity(torch.zeros(6, v), torch.arange(6)) == pytest.approx(v)
    sharp = torch.full((4, v), -1e4)
    targets = torch.tensor([3, 1, 4, 1])
    sharp[torch.arange(4), targets] = 1e4
    assert perplexity(sharp, targets) == pytest.approx(1.0)
    n = nll(torch.zeros(6, v), torch.arange(6))
    assert n.count == 6 and n.total == pytest.approx(6 * math.log(v))
    with pytest.raises(ValueError, match="targets"):
        nll(torch.zeros(3, v), torch.arange(4))
    with pytest.raises(ValueError, match="target ids"):
        nll(torch.zeros(2, v), torch.tensor([0, v]))


def test_nll_sums_merge():
    a, b = NLL(2.0, 1), NLL(4.0, 3)
    assert (a + b).mean == pytest.approx(1.5) and (a + b).perplexity == pytest.approx(math.exp(1.5))
    assert math.isnan(NLL(0.0, 0).perplexity)


class Bigram(torch.nn.Module):
    """A tiny causal model: logits at t depend only on token t."""

    def __init__(self, vocab: int = 13):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(3)))

    def forward(self, ids):
        return self.table[ids]


def test_teacher_forced_nll_scores_only_the_continuation():
    model = Bigram()
    ids = [1, 5, 2, 7, 7, 3, 0]
    start = 3  # prompt = ids[:3], continuation = ids[3:]
    got = teacher_forced_nll(model, ids, start)
    logp = model.table.detach().double().log_softmax(-1)
    expect = -sum(logp[ids[t - 1], ids[t]].item() for t in range(start, len(ids)))
    assert got.count == 4 and got.total == pytest.approx(expect)
    # batch-dimension outputs and tensor inputs are accepted; the whole sequence is one forward pass
    calls = []

    def fn(x):
        calls.append(x.shape)
        return model(x)[None]

    assert teacher_forced_nll(fn, torch.tensor(ids), start).total == pytest.approx(expect)
    assert calls == [torch.Size([7])]
    assert teacher_forced_nll(model, ids, len(ids)).count == 0
    with pytest.raises(ValueError, match="start"):
        teacher_forced_nll(model, ids, 0)
    with pytest.raises(ValueError, match="rows"):
        teacher_forced_nll(lambda x: torch.zeros(3, 13), ids, 2)


def test_metrics_import_is_cheap():
    import subprocess
    import sys

    code = "import sys, hotcold.quality.metrics, hotcold.quality.extract, hotcold.quality.sandbox; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
