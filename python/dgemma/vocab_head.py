"""PyTorch reference of the fused vocabulary head (the oracle of ``ops/cuda_vocab_head.py``).

One denoising step ends with, per canvas position, the processed logits
``z = softcap(h·Eᵀ)/t`` (softcap(x) = cap·tanh(x/cap)). The fused head reduces them to max, log-sum-exp,
entropy, argmax and a sample, runs the entropy-bounded acceptance, the stopping statistics, and builds
the next step's self-conditioning input ``softmax(z)·E·scale``, without materialising fp32 logits.

Random stream (the CUDA sampler's own; the reference backend keeps transformers' generator stream):
Philox4x32-10 keyed by ``(seed & 0xffffffff, seed >> 32)``, counter
``(word_index, position, step, sequence << 2 | purpose)``:

- purpose 0 (sample): vocab id v uses output word ``v & 3`` of counter ``(v >> 2, ...)``; the uniform
  ``u = (2·(word >> 9) + 1)·2^-24`` (open interval, exact in fp32) gives Gumbel noise ``−log(−log u)``
  and the sample is ``argmax(z + noise)`` (Gumbel-max: distributed as softmax(z)).
- purpose 1 (re-draw): word 0 of counter ``(0, position, step, sequence << 2 | 1)`` gives the uniform id
  ``(word · V) >> 32`` of a position that is not accepted.

``step`` must differ between calls that share a seed (count every denoising step of a generation).
This module mirrors the stream bit for bit on the CPU, so the GPU sampler can be checked exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_MASK = np.uint64(0xFFFFFFFF)
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
SAMPLE_STREAM, REDRAW_STREAM = 0, 1


def philox4x32_10(counter: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 of ``counter`` [..., 4] (uint32) under ``key`` (k0, k1); returns uint32 [..., 4]."""
    c = [np.asarray(counter, dtype=np.uint64)[..., i] for i in range(4)]
    k0, k1 = np.uint64(key[0] & 0xFFFFFFFF), np.uint64(key[1] & 0xFFFFFFFF)
    for r in range(10):
        if r:
            k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
        p0, p1 = c[0] * _M0, c[2] * _M1  # exact: both factors < 2^32
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & _MASK, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & _MASK]
    return np.stack(c, axis=-1).astype(np.uint32)


def step_scalars(temperature: float | torch.Tensor, seed: int | torch.Tensor, step: int | None
                 ) -> tuple[float, int, int]:
    """(temperature, seed, step) as host numbers from either form a head call accepts (reads tensors)."""
    if isinstance(seed, torch.Tensor):
        if step is not None:
            raise ValueError("step must be None when seed is a (seed, step) tensor")
        if seed.dtype != torch.int64 or seed.shape != (2,):
            raise ValueError(f"a seed tensor must be int64 [2] (seed, step), got {seed.dtype} {list(seed.shape)}")
        seed, step = (int(x) for x in seed.tolist())
        seed &= (1 << 64) - 1
    elif step is None:
        raise ValueError("step is required when seed is an int")
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"a temperature tensor must hold one value, got shape {list(temperature.shape)}")
        temperature = float(temperature.reshape(()))
    return temperature, seed, step


def seed_key(seed: int) -> tuple[int, int]:
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed {seed} must be in [0, 2**64)")
    return seed & 0xFFFFFFFF, seed >> 32


def open_uniform(words: np.ndarray) -> np.ndarray:
    """float32 uniforms in (0, 1) from uint32 words: (2·(w >> 9) + 1)·2^-24."""
    w = np.asarray(words, dtype=np.uint32)
    return (((w >> np.uint32(9)) << np.uint32(1)) | np.uint32(1)).astype(np.float32) * np.float32(2.0**-24)


def gumbel_noise(seed: int, step: int, batch: int, canvas: int, vocab: int) -> torch.Tensor:
    """The sampler's Gumbel noise −log(−log u), float32 [batch, canvas, vocab] (small vocabularies only)."""
    b, c, v = np.meshgrid(np.arange(batch, dtype=np.uint64), np.arange(canvas, dtype=np.uint64),
                          np.arange(vocab, dtype=np.uint64), indexing="ij")
    counter = np.stack([v >> np.uint64(2), c, np.full_like(v, step), (b << np.uint64(2)) | np.uint64(SAMPLE_STREAM)],
                       axis=-1)
    words = philox4x32_10(counter, seed_key(seed))
    word = np.take_along_axis(words, (v & np.uint64(3)).astype(np.int64)[..., None], axis=-1)[..., 0]
    u = torch.from_numpy(open_uniform(word))
    return -torch.log(-torch.log(u))


def redraw_ids(seed: int, step: int, batch: int, canvas: int, vocab: int) -> torch.Tensor:
    """Uniform re-draw ids int64 [batch, canvas] for positions that are not accepted."""
    b, c = np.meshgrid(np.arange(batch, dtype=np.uint64), np.arange(canvas, dtype=np.uint64), indexing="ij")
    counter = np.stack([np.zeros_like(c), c, np.full_like(c, step), (b << np.uint64(2)) | np.uint64(REDRAW_STREAM)],
                       axis=-1)
    word = philox4x32_10(counter, seed_key(seed))[..., 0].astype(np.uint64)
    return torch.from_numpy(((word * np.uint64(vocab)) >> np.uint64(32)).astype(np.int64))


def processed_logits(h: torch.Tensor, embed: torch.Tensor, temperature: float, softcap: float = 30.0
                     ) -> torch.Tensor:
    """fp32 z = softcap(h·Eᵀ)/t with the product in fp32 (the inputs' exact values, no bf16 rounding)."""
    x = torch.matmul(h.float(), embed.float().t())
    return softcap * torch.tanh(x / softcap) / torch.tensor(temperature, dtype=torch.float32)


def head_statistics(z: torch.Tensor) -> dict[str, torch.Tensor]:
    """Direct fp32 max, log-sum-exp, entropy (of softmax(z)) and argmax over the last dimension."""
    log_p = torch.log_softmax(z, dim=-1)
    return {"max": z.amax(dim=-1), "lse": torch.logsumexp(z, dim=-1),
            "entropy": -(log_p.exp() * log_p).sum(dim=-1), "argmax": z.argmax(dim=-1)}


def tiled_statistics(z: torch.Tensor, chunk: int) -> dict[str, torch.Tensor]:
    """The kernel's reduction: per chunk of ``chunk`` columns (m, Σe^(z−m), Σe^(z−m)(z−m)), merged left to
    right with rescaling; entropy = log s − t/s. Equals :func:`head_statistics` up to rounding."""
    m = torch.full(z.shape[:-1], -3.0e38)
    s, t = torch.zeros_like(m), torch.zeros_like(m)
    for start in range(0, z.shape[-1], chunk):
        zc = z[..., start:start + chunk]
        mc = zc.amax(dim=-1)
        e = torch.exp(zc - mc[..., None])
        sc, tc = e.sum(-1), (e * (zc - mc[..., None])).sum(-1)
        mx = torch.maximum(m, mc)
        fa, fb = torch.exp(m - mx), torch.exp(mc - mx)
        t = fa * (t + (m - mx) * s) + fb * (tc + (mc - mx) * sc)
        s = fa * s + fb * sc
        m = mx
    return {"max": m, "lse": m + torch.log(s), "entropy": torch.log(s) - t / s, "argmax": z.argmax(dim=-1)}


def accept_mask(entropy: torch.Tensor, bound: float) -> torch.Tensor:
    """The kernel's acceptance: stable rank by entropy, cumsum accumulated in double and rounded to fp32
    per element (torch's CPU cumsum), ``cumsum − current <= bound`` in fp32. Same mask as
    :func:`dgemma.sampler.entropy_bound_accept`."""
    sorted_e, order = torch.sort(entropy.float(), dim=-1, stable=True)
    cum = torch.cumsum(sorted_e.double(), dim=-1).float()
    selected = (cum - sorted_e) <= torch.tensor(bound, dtype=torch.float32)
    return torch.scatter(torch.zeros_like(selected), -1, order, selected)


def soft_embedding(z: torch.Tensor, embed: torch.Tensor, scale: float) -> torch.Tensor:
    """Self-conditioning input: softmax(z) rounded to bf16, times E (fp32 products), times bf16(scale)."""
    probs = torch.softmax(z.float(), dim=-1).to(torch.bfloat16).float()
    scale = torch.tensor(scale, dtype=torch.float32).to(torch.bfloat16).float()
    return (torch.matmul(probs, embed.float()) * scale).to(torch.bfloat16)


def chunked_soft_embedding(z: torch.Tensor, embed: torch.Tensor, scale: float, chunk: int = 64) -> torch.Tensor:
    """The kernel's numerics: q = bf16(exp(z − m_chunk)) stored per 64-column chunk, rescaled to
    bf16(q · exp(m_chunk − lse)) before the product with E."""
    *lead, v = z.shape
    pad = (-v) % chunk
    zp = torch.nn.functional.pad(z.float(), (0, pad), value=-torch.inf).view(*lead, -1, chunk)
    m = zp.amax(dim=-1, keepdim=True)
    q = torch.exp(zp - m).to(torch.bfloat16).float()
    lse = torch.logsumexp(z.float(), dim=-1)[..., None, None]
    p = (q * torch.exp(m - lse)).to(torch.bfloat16).float().reshape(*lead, -1)[..., :v]
    scale = torch.tensor(scale, dtype=torch.float32).to(torch.bfloat16).float()
    return (torch.matmul(p, embed.float()) * scale).to(torch.bfloat16)


# The FP8 self-conditioning pass (DGEMMA_VOCAB_HEAD_SOFT=fp8, csrc/kernels/vocab_head_sm90_soft.cuh): the
# product P·E on FP8 tensor cores, the probabilities in e5m2 and E transposed and quantised per hidden channel in e4m3
# once at load.
SOFT_PRECISIONS = ("bf16", "fp8")
# The probabilities' format and its largest value: e5m2 for its range (its smallest subnormal is 2^-16 / 57344 of the
# largest: tokens up to ~22 nats below a row's top keep their mass; e4m3's 2^-9 / 448 flushes a long tail 12 nats
# down to zero, which loses up to ~10 % of a peaked row's mass and moved soft by 11 % in the tests).
P_FP8_DTYPE = torch.float8_e5m2
P_FP8_MAX = 57344.0
_EMBED_FP8_CHANNELS = 256  # hidden channels quantised per slice (bounds the fp32 temporary at load)


def vocab_pad(vocab: int) -> int:
    """The vocabulary rounded up to the head's 128-wide tiles (the FP8 operand's columns)."""
    return -(-vocab // 128) * 128


def embedding_fp8(embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8 self-conditioning operand of the table E ``[V, H]``: Eᵀ quantised per hidden channel (each row of Eᵀ
    by :func:`dgemma.quant.quantize_rows`: scale = amax / 448, e4m3 round to nearest even), e4m3 ``[H, vocab_pad]``
    with zero columns past V, and its fp32 scales ``[H]``; ``E[v, c] ≈ q[c, v] · scale[c]``. On E's device."""
    from .quant import FP8_DTYPE, quantize_rows

    v, hidden = embed.shape
    q = torch.zeros(hidden, vocab_pad(v), dtype=FP8_DTYPE, device=embed.device)
    scale = torch.empty(hidden, dtype=torch.float32, device=embed.device)
    for c0 in range(0, hidden, _EMBED_FP8_CHANNELS):
        c1 = min(hidden, c0 + _EMBED_FP8_CHANNELS)
        q[c0:c1, :v], scale[c0:c1] = quantize_rows(embed[:, c0:c1].t())
    return q, scale


def fp8_soft_embedding(z: torch.Tensor, embed_fp8: tuple[torch.Tensor, torch.Tensor], scale: float,
                       chunk: int = 64) -> torch.Tensor:
    """The FP8 pass's numerics (:func:`chunked_soft_embedding`'s stored q = bf16(exp(z − m_chunk)), then):
    P8 = e5m2(57344 · q · exp(m_chunk − M)) with M the row's maximum (the most likely token's probability maps to
    57344, e5m2's largest), the row's scale bf16(scale) · exp(M − lse) / 57344, and
    soft = bf16(Σ_v P8·q_E · row scale · channel scale) with ``embed_fp8`` = (q_E [H, vocab_pad] e4m3, channel
    scales [H]) from :func:`embedding_fp8`."""
    eq, escale = embed_fp8
    *lead, v = z.shape
    width = eq.shape[1]
    zf = z.float()
    zp = torch.nn.functional.pad(zf, (0, width - v), value=-torch.inf).view(*lead, -1, chunk)
    m = zp.amax(dim=-1, keepdim=True)
    q = torch.where(zp == -torch.inf, 0.0, torch.exp(zp - m)).to(torch.bfloat16).float()
    row_max = zf.amax(dim=-1)[..., None, None]
    lse = torch.logsumexp(zf, dim=-1)
    p8 = (q * (P_FP8_MAX * torch.exp(m - row_max))).clamp(max=P_FP8_MAX).to(P_FP8_DTYPE)
    scale = torch.tensor(scale, dtype=torch.float32).to(torch.bfloat16).float()
    row_scale = scale * (torch.exp(zf.amax(dim=-1) - lse) / P_FP8_MAX)
    # Products of an e5m2 and an e4m3 value (3 + 4 significant bits) are exact in fp32; the sums are fp32, as the
    # kernel's accumulators.
    acc = p8.reshape(*lead, width).float() @ eq.to(zf.device).float().t()
    return ((acc * row_scale[..., None]) * escale.to(zf.device)).to(torch.bfloat16)


@dataclass(slots=True)
class VocabHeadStep:
    """Outputs of one fused vocabulary-head call; [B, C] per position, [B] per sequence."""

    argmax: torch.Tensor        # int64 [B, C]: argmax of z (the committed canvas when the block stops)
    sample: torch.Tensor        # int64 [B, C]: Gumbel-max draw from softmax(z)
    next_canvas: torch.Tensor   # int64 [B, C]: accepted → sample, others → uniform re-draw
    accepted: torch.Tensor      # bool [B, C]
    entropy: torch.Tensor       # fp32 [B, C]: entropy of softmax(z)
    max_logit: torch.Tensor     # fp32 [B, C]: max of z
    lse: torch.Tensor           # fp32 [B, C]: log-sum-exp of z
    mean_entropy: torch.Tensor  # fp32 [B]
    stable: torch.Tensor        # bool [B]: argmax equals prev_argmax at every position
    finished: torch.Tensor      # bool [B]: finished_in | (stable & mean_entropy < confidence)
    soft: torch.Tensor | None   # bf16 [B, C, H]: softmax(z)·E·scale, the next step's self-conditioning input


def reference_vocab_head_step(h: torch.Tensor, embed: torch.Tensor, temperature: float, seed: int, step: int,
                              canvas: torch.Tensor, prev_argmax: torch.Tensor | None, entropy_bound: float, *,
                              confidence_threshold: float = 0.005, finished: torch.Tensor | None = None,
                              softcap: float = 30.0, soft_scale: float | None = None,
                              self_conditioning: bool = True,
                              embed_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> VocabHeadStep:
    """fp32 CPU reference of :func:`dgemma.ops.cuda_vocab_head.vocab_head_step` (same arguments and
    random stream). Rows of ``finished`` sequences keep ``canvas`` and ``prev_argmax``. The step scalars may
    be given as tensors, as the CUDA op takes them for graph replay: ``temperature`` a one-element fp32
    tensor, ``seed`` an int64 tensor ``[2]`` holding (seed, step) with ``step`` None. ``embed_fp8``
    (:func:`embedding_fp8`): the self-conditioning input of the FP8 pass (:func:`fp8_soft_embedding`)."""
    temperature, seed, step = step_scalars(temperature, seed, step)
    b, c, hidden = h.shape
    v = embed.shape[0]
    z = processed_logits(h, embed, temperature, softcap)
    stats = head_statistics(z)
    sample = (z + gumbel_noise(seed, step, b, c, v)).argmax(dim=-1)
    accepted = accept_mask(stats["entropy"], entropy_bound)
    next_canvas = torch.where(accepted, sample, redraw_ids(seed, step, b, c, v))
    prev = torch.full_like(stats["argmax"], -1) if prev_argmax is None else prev_argmax.cpu()
    stable = (stats["argmax"] == prev).all(dim=-1)
    # The kernel's order: a sequential double sum (cumsum runs in order; sum may pair terms differently, and a sum of
    # 256 fp32 entropies spanning many binades is not always exact in double).
    mean = (stats["entropy"].double().cumsum(dim=-1)[..., -1] / c).float()
    done = torch.zeros(b, dtype=torch.bool) if finished is None else finished.cpu()
    argmax = stats["argmax"]
    if finished is not None:
        next_canvas = torch.where(done[:, None], canvas.cpu(), next_canvas)
        argmax = torch.where(done[:, None], prev, argmax)
    soft = None
    if self_conditioning:
        scale = hidden ** 0.5 if soft_scale is None else soft_scale
        soft = soft_embedding(z, embed, scale) if embed_fp8 is None else fp8_soft_embedding(z, embed_fp8, scale)
    return VocabHeadStep(argmax=argmax, sample=sample, next_canvas=next_canvas, accepted=accepted,
                         entropy=stats["entropy"], max_logit=stats["max"], lse=stats["lse"], mean_entropy=mean,
                         stable=stable, finished=done | (stable & (mean < confidence_threshold)), soft=soft)
