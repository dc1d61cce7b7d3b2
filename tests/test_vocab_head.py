"""CPU tests of the fused vocabulary head's reference (dgemma.vocab_head): the Philox stream, the
Gumbel-max sampler, the acceptance rule, the tiled statistics and the chunked self-conditioning input."""

import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from dgemma import _ext
from dgemma.errors import BackendUnavailableError
from dgemma.ops.reference import ReferenceOps
from dgemma.sampler import entropy_bound_accept
from dgemma.vocab_head import (accept_mask, chunked_soft_embedding, gumbel_noise, head_statistics, open_uniform,
                               philox4x32_10, processed_logits, redraw_ids, reference_vocab_head_step,
                               soft_embedding, tiled_statistics)

ROOT = Path(__file__).resolve().parents[1]

# Random123 kat_vectors: counter[4], key[2] -> output[4].
PHILOX_KAT = [
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    assert philox4x32_10(np.array(counter, dtype=np.uint32), tuple(key)).tolist() == expected


def test_philox_batched_equals_single():
    rng = np.random.default_rng(1)
    ctr = rng.integers(0, 2**32, size=(7, 5, 4), dtype=np.uint64).astype(np.uint32)
    batched = philox4x32_10(ctr, (0x12345678, 0x9ABCDEF0))
    assert batched.shape == (7, 5, 4) and batched.dtype == np.uint32
    for idx in [(0, 0), (3, 4), (6, 2)]:
        assert (batched[idx] == philox4x32_10(ctr[idx], (0x12345678, 0x9ABCDEF0))).all()


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to compile the header on the host")
def test_philox_header_matches_reference(tmp_path):
    """csrc/kernels/philox.cuh (host path) produces the same words and uniforms as the Python mirror."""
    src = tmp_path / "philox_host.cpp"
    src.write_text(
        '#include <cstdio>\n#include "kernels/philox.cuh"\nusing namespace dgemma::kernels;\n'
        "int main() { unsigned c0, c1, c2, c3, k0, k1;\n"
        "  while (std::scanf(\"%u %u %u %u %u %u\", &c0, &c1, &c2, &c3, &k0, &k1) == 6) {\n"
        "    Philox4x32 r = philox4x32_10(c0, c1, c2, c3, k0, k1);\n"
        "    std::printf(\"%u %u %u %u %.9g %u\\n\", r.v[0], r.v[1], r.v[2], r.v[3], philox_open_uniform(r.v[0]),\n"
        "                philox_uniform_below(r.v[1], 262143u)); } }\n")
    exe = tmp_path / "philox_host"
    subprocess.run(["g++", "-std=c++17", "-O1", f"-I{ROOT / 'csrc'}", str(src), "-o", str(exe)], check=True)
    rng = np.random.default_rng(2)
    inputs = rng.integers(0, 2**32, size=(200, 6), dtype=np.uint64)
    inputs[0] = 0
    text = "\n".join(" ".join(str(int(x)) for x in row) for row in inputs)
    lines = subprocess.run([str(exe)], input=text, capture_output=True, text=True, check=True).stdout.split("\n")
    for row, line in zip(inputs, lines):
        got = line.split()
        words = philox4x32_10(row[:4].astype(np.uint32), (int(row[4]), int(row[5])))
        assert [int(x) for x in got[:4]] == words.tolist()
        assert np.float32(float(got[4])) == open_uniform(words[0])
        assert int(got[5]) == (int(words[1]) * 262143) >> 32


def test_open_uniform_is_open_and_exact():
    u = open_uniform(np.array([0, 511, 512, 0xFFFFFFFF], dtype=np.uint32))
    assert u.dtype == np.float32
    assert u[0] == u[1] == np.float32(2.0**-24)
    assert u[2] == np.float32(3 * 2.0**-24)
    assert u[3] == np.float32(1 - 2.0**-24) and u[3] < 1
    g = -np.log(-np.log(u.astype(np.float64)))
    assert g.max() < 17.0  # the kernel's skip bound (kGumbelBound)


def test_gumbel_noise_streams_are_distinct_and_reproducible():
    a = gumbel_noise(5, 3, 2, 9, 13)
    assert a.shape == (2, 9, 13) and a.dtype == torch.float32
    assert torch.equal(a, gumbel_noise(5, 3, 2, 9, 13))
    assert not torch.equal(a[0], a[1])  # sequences differ
    assert not torch.equal(a, gumbel_noise(5, 4, 2, 9, 13))  # steps differ
    assert not torch.equal(a, gumbel_noise(6, 3, 2, 9, 13))  # seeds differ
    assert not torch.equal(a, gumbel_noise(5 + 2**32, 3, 2, 9, 13))  # the seed's high word is used
    # Standard Gumbel: mean = Euler-Mascheroni constant, variance pi^2 / 6.
    g = gumbel_noise(7, 0, 1, 1000, 64).double()
    assert abs(g.mean().item() - 0.5772) < 0.02
    assert abs(g.var().item() - math.pi**2 / 6) < 0.06


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square p-value of observed counts against probabilities (regularised upper gamma)."""
    expected = probs * counts.sum()
    x = float(((counts - expected) ** 2 / expected).sum())
    return float(torch.special.gammaincc(torch.tensor((len(counts) - 1) / 2, dtype=torch.float64),
                                         torch.tensor(x / 2, dtype=torch.float64)))


def test_gumbel_max_sampler_chi_square():
    """argmax(z + Gumbel) over 40,000 positions with the same z follows softmax(z), and the test can fail."""
    gen = torch.Generator().manual_seed(3)
    v, n = 11, 40_000
    z = torch.randn(v, generator=gen) * 1.5
    draws = (z + gumbel_noise(11, 2, 1, n, v)).argmax(dim=-1).view(-1)
    counts = torch.bincount(draws, minlength=v).numpy()
    probs = torch.softmax(z.double(), dim=-1).numpy()
    assert chi_square_p(counts, probs) > 1e-4
    wrong = torch.softmax(z.double() * 1.1, dim=-1).numpy()
    assert chi_square_p(counts, wrong) < 1e-6


def test_redraw_ids_uniform_in_range():
    ids = redraw_ids(9, 1, 40, 1000, 7)
    assert ids.shape == (40, 1000) and ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < 7
    assert chi_square_p(torch.bincount(ids.view(-1), minlength=7).numpy(), np.full(7, 1 / 7)) > 1e-4
    big = redraw_ids(9, 1, 2, 256, 262144)
    assert int(big.max()) < 262144 and big.unique().numel() > 500
    assert not torch.equal(big, redraw_ids(9, 2, 2, 256, 262144))


@pytest.mark.parametrize("batch,canvas", [(1, 256), (3, 37), (2, 1)])
@pytest.mark.parametrize("bound", [0.1, 1.0, 5.0, 1e-6])
def test_accept_mask_equals_sampler(batch, canvas, bound):
    gen = torch.Generator().manual_seed(batch * 1000 + canvas)
    entropy = torch.rand(batch, canvas, generator=gen) ** 3 * 2
    entropy[:, ::5] = 0.0  # exact zeros (confident positions) tie without changing the cumsum
    mask = accept_mask(entropy, bound)
    assert torch.equal(mask, entropy_bound_accept(entropy, bound))
    assert bool(mask.any(dim=-1).all())  # always at least one


def test_accept_mask_ties_rank_by_index():
    """Non-zero ties at the boundary: torch.sort is unstable, so the reference may accept any of the tied
    positions; the count agrees and the kernel's choice is the lowest indices."""
    gen = torch.Generator().manual_seed(8)
    entropy = torch.rand(2, 256, generator=gen) ** 3
    entropy[:, 3::7] = 0.03125
    mask = accept_mask(entropy, 1.0)
    assert torch.equal(mask.sum(-1), entropy_bound_accept(entropy, 1.0).sum(-1))
    tied = mask[:, 3::7].int()
    assert bool((tied[:, :-1] >= tied[:, 1:]).all())  # accepted ties form an index prefix
    assert 0 < int(tied.sum()) < tied.numel()  # the boundary does fall inside the ties


def test_accept_mask_detects_a_different_bound():
    entropy = torch.rand(2, 256, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(accept_mask(entropy, 1.0), entropy_bound_accept(entropy, 3.0))


@pytest.mark.parametrize("chunk", [64, 7, 1000])
def test_tiled_statistics_match_direct(chunk):
    gen = torch.Generator().manual_seed(chunk)
    z = torch.randn(5, 33, 999, generator=gen) * 6
    z[0, 0] = 0.0  # uniform row: entropy log(V)
    z[0, 1, 17] = 80.0  # one-hot row: entropy ~0
    direct, tiled = head_statistics(z), tiled_statistics(z, chunk)
    for key in ("max", "lse"):
        torch.testing.assert_close(tiled[key], direct[key], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tiled["entropy"], direct["entropy"], rtol=1e-4, atol=1e-5)
    assert abs(direct["entropy"][0, 0].item() - math.log(999)) < 1e-4
    assert direct["entropy"][0, 1].item() < 1e-6
    categorical = torch.distributions.Categorical(logits=z).entropy()
    torch.testing.assert_close(direct["entropy"], categorical, rtol=1e-4, atol=1e-5)
    assert torch.equal(direct["argmax"], z.argmax(dim=-1))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("temperature", [0.4, 0.8])
def test_chunked_soft_embedding_matches_reference(temperature):
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(2, 19, 64, generator=gen).to(torch.bfloat16)
    embed = (torch.randn(1111, 64, generator=gen) * (3 / 8)).to(torch.bfloat16)
    z = processed_logits(h, embed, temperature)
    want = ReferenceOps().soft_embedding(z, embed, 8.0)  # the model's op on fp32 logits
    assert _rel(soft_embedding(z, embed, 8.0), want) < 1e-2
    assert _rel(chunked_soft_embedding(z, embed, 8.0), want) < 2e-2
    assert _rel(chunked_soft_embedding(z * 0.5, embed, 8.0), want) > 5e-2  # the check can fail


def test_processed_logits_match_model_ops():
    gen = torch.Generator().manual_seed(6)
    h = torch.randn(1, 7, 64, generator=gen)
    embed = torch.randn(300, 64, generator=gen)
    z = processed_logits(h, embed, 0.5)
    torch.testing.assert_close(z, ReferenceOps().lm_head_softcap(h, embed, 30.0) / 0.5, rtol=1e-5, atol=1e-5)
    assert float(z.abs().max()) <= 60.0


def test_reference_step_semantics():
    gen = torch.Generator().manual_seed(7)
    b, c, hdim, v = 2, 23, 64, 500
    h = torch.randn(b, c, hdim, generator=gen).to(torch.bfloat16)
    embed = (torch.randn(v, hdim, generator=gen) * 0.6).to(torch.bfloat16)
    canvas = torch.randint(0, v, (b, c), generator=gen)
    out = reference_vocab_head_step(h, embed, 0.5, 42, 3, canvas, None, 2.0)
    z = processed_logits(h, embed, 0.5)
    assert torch.equal(out.sample, (z + gumbel_noise(42, 3, b, c, v)).argmax(-1))
    assert torch.equal(out.accepted, entropy_bound_accept(out.entropy, 2.0))
    assert torch.equal(out.next_canvas, torch.where(out.accepted, out.sample, redraw_ids(42, 3, b, c, v)))
    assert not bool(out.stable.any()) and not bool(out.finished.any())
    again = reference_vocab_head_step(h, embed, 0.5, 42, 3, canvas, out.argmax, 2.0, confidence_threshold=1e9)
    assert bool(again.stable.all()) and bool(again.finished.all())
    torch.testing.assert_close(out.mean_entropy, out.entropy.mean(-1))
    done = torch.tensor([True, False])
    kept = reference_vocab_head_step(h, embed, 0.5, 42, 4, canvas, out.argmax, 2.0, finished=done)
    assert torch.equal(kept.next_canvas[0], canvas[0]) and bool(kept.finished[0])
    assert torch.equal(kept.argmax[0], out.argmax[0])
    assert kept.soft.shape == (b, c, hdim) and kept.soft.dtype == torch.bfloat16


def test_cuda_wrapper_reports_missing_backend():
    if _ext.cuda_status() is None:
        pytest.skip("CUDA is usable here; covered by tests/test_vocab_head_cuda.py")
    from dgemma.ops.cuda_vocab_head import vocab_head_step

    h = torch.randn(1, 4, 64).to(torch.bfloat16)
    with pytest.raises(BackendUnavailableError):
        vocab_head_step(h, torch.randn(10, 64).to(torch.bfloat16), 0.5, 0, 0, torch.zeros(1, 4, dtype=torch.long),
                        None, 0.1)



def test_the_head_implementation_comes_from_the_argument_or_the_environment(monkeypatch):
    from dgemma.errors import DgemmaError
    from dgemma.ops.cuda_vocab_head import DEFAULT_IMPL, IMPLS, head_impl

    monkeypatch.delenv("DGEMMA_VOCAB_HEAD", raising=False)
    assert head_impl() == DEFAULT_IMPL and set(IMPLS) == {"mma_sync", "wgmma"}
    monkeypatch.setenv("DGEMMA_VOCAB_HEAD", "wgmma")
    assert head_impl() == "wgmma" and head_impl("mma_sync") == "mma_sync"
    monkeypatch.setenv("DGEMMA_VOCAB_HEAD", "")
    assert head_impl() == DEFAULT_IMPL
    monkeypatch.setenv("DGEMMA_VOCAB_HEAD", "tma")
    with pytest.raises(DgemmaError, match=r"DGEMMA_VOCAB_HEAD = 'tma' is not a vocabulary-head implementation; "
                                          r"expected one of mma_sync, wgmma"):
        head_impl()
    with pytest.raises(DgemmaError, match=r"impl = 'wgmma2' is not"):
        head_impl("wgmma2")
