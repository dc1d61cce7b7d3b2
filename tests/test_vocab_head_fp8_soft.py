"""The FP8 self-conditioning pass of the vocabulary head (DGEMMA_VOCAB_HEAD_SOFT=fp8): its table, its numerics
against the bf16 pass, the setting and the memory it needs. CPU; the kernels' GPU tests are in
test_vocab_head_cuda.py.

Stated error (what the FP8 pass costs, measured here on every run): the self-conditioning input soft = softmax(z)·E·s
computed from e5m2 probabilities (relative to the row's most likely token) and an e4m3 table (per hidden channel)
is within 3.5 % (relative Frobenius norm) of the bf16 pass's, over flat, moderate and peaked distributions and
peaked ones with a long tail 8-24 nats below the top over tables with a shared direction (as trained embeddings
have); the table's own quantisation (about 2.6 %) is most of it. (e4m3 probabilities flush such a tail to zero: up
to 11 % there.) That is about ten times the bf16 pass's own error against the
exact product (0.2 %). No model-level bound is stated: on random weights the decoder amplifies any change of its
input (the bf16 pass's 0.2 % already moves the next step's logits by 10-70 %), so the FP8 pass's effect on
generation needs a trained checkpoint to measure.
"""

import pytest
import torch

from dgemma.errors import DgemmaError
from dgemma.quant import FP8_DTYPE
from dgemma.vocab_head import (embedding_fp8, fp8_soft_embedding, processed_logits, reference_vocab_head_step,
                               soft_embedding, vocab_pad)

FP8_SOFT_BOUND = 3.5e-2


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _table(v, hidden, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(v, hidden, generator=gen) / hidden**0.5).to(torch.bfloat16)


def test_the_fp8_table_is_the_transposed_table_quantised_per_channel():
    torch.manual_seed(0)
    v, hidden = 1000, 320  # 320 channels: two slices of the chunked quantisation, the second partial
    embed = _table(v, hidden, 1)
    embed[:, 7] = 0  # an all-zero channel keeps a finite scale and zero codes
    q, scale = embedding_fp8(embed)
    assert q.dtype == FP8_DTYPE and tuple(q.shape) == (hidden, vocab_pad(v)) == (hidden, 1024)
    assert scale.dtype == torch.float32 and tuple(scale.shape) == (hidden,)
    assert torch.equal(q[:, v:].float(), torch.zeros(hidden, 1024 - v))
    amax = embed.float().abs().amax(dim=0)
    assert torch.equal(scale, amax.clamp(min=1e-12) / torch.full_like(amax, 448.0))
    assert torch.equal(q[7].float(), torch.zeros(1024))
    # Each channel's largest magnitude is e4m3's largest; every value within e4m3's rounding (2^-4 relative for
    # normals, half the smallest subnormal step 2^-10 · scale below them).
    assert torch.equal(q[:, :v].float().abs().amax(dim=1)[amax > 0], torch.full((hidden - 1,), 448.0))
    deq = q[:, :v].float() * scale[:, None]
    err = (deq - embed.float().t()).abs()
    assert (err <= embed.float().t().abs() * 2.0**-4 + scale[:, None] * 2.0**-10).all()


@pytest.mark.parametrize("spread,t", [(0.3, 1.0), (1.0, 1.0), (3.0, 1.0), (3.0, 0.5), (10.0, 0.3)])
def test_fp8_soft_embedding_is_within_the_stated_error_of_bf16(spread, t):
    torch.manual_seed(1)
    v, hidden = 5000, 192
    embed = _table(v, hidden, 2)
    e8 = embedding_fp8(embed)
    h = torch.randn(2, 24, hidden).to(torch.bfloat16)
    z = processed_logits(h, (embed.float() * spread).to(torch.bfloat16), t)
    fp8 = fp8_soft_embedding(z, e8, hidden**0.5)
    bf16 = soft_embedding(z, embed, hidden**0.5)
    assert fp8.dtype == torch.bfloat16 and fp8.shape == bf16.shape
    assert torch.isfinite(fp8.float()).all()
    assert _rel(fp8, bf16) <= FP8_SOFT_BOUND


@pytest.mark.parametrize("gap", [8.0, 12.0, 13.0, 14.0, 18.0, 24.0])
def test_fp8_soft_embedding_keeps_a_long_tail(gap):
    """A peaked row over a large vocabulary: four tokens `gap` nats above a flat tail of 131,072 (at gap 13 the tail
    holds ~4 % of the mass at 2e-6 of the top's probability each), over a table whose rows share a direction (the
    tail's mass then moves soft): within the stated error, as e4m3 probabilities (which flush it) are not."""
    v, hidden = 131072, 64
    gen = torch.Generator().manual_seed(7)
    embed = (torch.randn(v, hidden, generator=gen) / hidden**0.5
             + 3.0 * torch.randn(1, hidden, generator=gen) / hidden**0.5).to(torch.bfloat16)
    z = torch.zeros(1, 2, v)
    z[..., :4] = gap
    got = fp8_soft_embedding(z, embedding_fp8(embed), hidden**0.5)
    assert _rel(got, soft_embedding(z, embed, hidden**0.5)) <= FP8_SOFT_BOUND


def test_fp8_soft_embedding_of_a_certain_row_is_that_tokens_dequantised_row():
    """A row whose probability is all on one token: P8 is e5m2's largest (57344) there and 0 elsewhere, the row scale
    s/57344, so soft is exactly bf16(s · dequantised E row)."""
    v, hidden = 300, 64
    embed = _table(v, hidden, 3)
    q, scale = embedding_fp8(embed)
    z = torch.full((1, 1, v), -1e4)
    z[0, 0, 123] = 10.0
    got = fp8_soft_embedding(z, (q, scale), 8.0)
    want = ((q[:, 123].float() * (8.0 / 57344.0 * 57344.0)) * scale).to(torch.bfloat16)
    assert torch.equal(got[0, 0], want)


def test_the_reference_step_takes_the_fp8_table():
    v, hidden = 700, 128
    embed = _table(v, hidden, 4)
    h = torch.randn(2, 9, hidden).to(torch.bfloat16)
    canvas = torch.randint(0, v, (2, 9))
    args = (h, embed, 0.7, 11, 3, canvas, None, 0.1)
    plain = reference_vocab_head_step(*args)
    fp8 = reference_vocab_head_step(*args, embed_fp8=embedding_fp8(embed))
    for name in ("argmax", "sample", "next_canvas", "accepted", "entropy", "max_logit", "lse", "mean_entropy",
                 "stable", "finished"):
        assert torch.equal(getattr(plain, name), getattr(fp8, name)), name
    assert not torch.equal(plain.soft, fp8.soft)
    assert _rel(fp8.soft, plain.soft) <= FP8_SOFT_BOUND


def test_the_soft_precision_setting(monkeypatch):
    from dgemma.ops.cuda_vocab_head import soft_precision

    monkeypatch.delenv("DGEMMA_VOCAB_HEAD_SOFT", raising=False)
    assert soft_precision() == "bf16"
    monkeypatch.setenv("DGEMMA_VOCAB_HEAD_SOFT", "fp8")
    assert soft_precision() == "fp8"
    monkeypatch.setenv("DGEMMA_VOCAB_HEAD_SOFT", "int4")
    with pytest.raises(DgemmaError, match="DGEMMA_VOCAB_HEAD_SOFT = 'int4' is not a self-conditioning precision; "
                                          "expected one of bf16, fp8"):
        soft_precision()


def test_the_memory_plan_counts_the_fp8_pass(monkeypatch):
    from dgemma.config import ModelConfig
    from dgemma.memory import step_workspace_bytes
    from dgemma.random_checkpoint import preset_config

    cfg = ModelConfig.from_dict(preset_config("26b-a4b"))
    monkeypatch.delenv("DGEMMA_VOCAB_HEAD_SOFT", raising=False)
    monkeypatch.delenv("DGEMMA_VOCAB_HEAD_STATS", raising=False)
    base = step_workspace_bytes(cfg, 2, 4096, torch.bfloat16, fused_vocab_head=True)
    monkeypatch.setenv("DGEMMA_VOCAB_HEAD_SOFT", "fp8")
    fp8 = step_workspace_bytes(cfg, 2, 4096, torch.bfloat16, fused_vocab_head=True)
    tokens, width = 2 * cfg.canvas_length, vocab_pad(cfg.vocab_size)
    assert fp8 - base == tokens * (width + 4) + cfg.hidden_size * (width + 4)
