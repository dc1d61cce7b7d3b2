"""Attention kernels vs torch SDPA on DiffusionGemma's shapes (H100 targets in the comments).

    python bench/bench_attention.py --out bench/results/attention.json

FLOPs count 4*q*k*d per query head (QK^T and PV); causal cases count only the unmasked keys.
SDPA runs on the same inputs with the visible K/V already gathered into contiguous tensors (the
gather is not timed), scale 1, grouped heads expanded by enable_gqa.

Rows: ``{case}`` is the kernel generation runs (DGEMMA_ATTENTION, else the default ``auto``, resolved per case by
dgemma.ops.cuda_attention.kernel_for), ``{case}_{impl}`` each kernel, and
``{case}_torch_sdpa`` SDPA. ``speedup_vs_sdpa``: SDPA's median over the kernel's, same run; ``peak_share``: the
kernel's FLOP/s over torch's bf16 matmul rate measured in this run (bench/common.py bf16_matmul_flops).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import bf16_matmul_flops, median, roofline_ms, time_cuda, write_results  # noqa: E402

from dgemma import _ext  # noqa: E402
from dgemma.ops.cuda_attention import (IMPLS, attention_impl, decoder_attention, encoder_attention,  # noqa: E402
                                       kernel_for)
from dgemma.ops.reference import ReferenceOps  # noqa: E402

BF16 = torch.bfloat16


def _randn(gen, *shape, scale=1.0):
    return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(BF16)


def _case(name, *, batch, d, hq, hkv, window, ring, prefix, t, causal, splits=()):
    gen = torch.Generator(device="cuda").manual_seed(0)
    slots = ring if ring else prefix + t
    ck, cv = _randn(gen, batch, hkv, slots, d), _randn(gen, batch, hkv, slots, d)
    q = _randn(gen, batch, t, hq, d, scale=1.5 / math.sqrt(d)).transpose(1, 2)
    tk = _randn(gen, batch, t, hkv, d).transpose(1, 2)
    tv = _randn(gen, batch, t, hkv, d).transpose(1, 2)
    out = torch.empty(batch, t, hq, d, dtype=BF16, device="cuda")
    visible = min(prefix, window - 1) if window else prefix
    pos = torch.arange(prefix - visible, prefix, device="cuda")
    slot = pos % ring if ring else pos
    keys, values = torch.cat((ck[:, :, slot], tk), 2).contiguous(), torch.cat((cv[:, :, slot], tv), 2).contiguous()
    qc = q.contiguous()
    mask = None
    if causal:
        kpos = torch.arange(prefix - visible, prefix + t, device="cuda")
        qpos = torch.arange(prefix, prefix + t, device="cuda")
        mask = kpos[None] <= qpos[:, None]
        if window:
            mask &= kpos[None] > qpos[:, None] - window
        pairs = int(mask.sum())
    else:
        pairs = t * (visible + t)

    lens = torch.full((batch,), prefix, dtype=torch.int32, device="cuda")

    def kernel(impl, num_splits=None):
        if causal:
            return lambda: encoder_attention(q, tk, tv, ck, cv, lens, ring, window, out=out, max_prefix=prefix,
                                             impl=impl)
        return lambda: decoder_attention(q, ck, cv, tk, tv, lens, ring, window, out=out, max_prefix=prefix, impl=impl,
                                         num_splits=num_splits)

    def sdpa():
        return F.scaled_dot_product_attention(qc, keys, values, attn_mask=mask, scale=1.0, enable_gqa=True)

    ref = ReferenceOps().attention(q[:1].float(), keys[:1].float(), values[:1].float(),
                                   None if mask is None else mask[None])
    flops = 4.0 * pairs * d * hq * batch
    bytes_moved = 2 * (2 * batch * hkv * (visible + t) * d + 2 * batch * hq * t * d)
    shape = dict(batch=batch, head_dim=d, prefix=prefix, queries=t)
    rate = bf16_matmul_flops()
    try:
        sdpa_ms = median(time_cuda(sdpa, warmup=3, iters=20))
    except RuntimeError as e:  # e.g. SDPA without a kernel for this head dim / memory
        print(f"{name}_torch_sdpa: {e}")
        sdpa_ms = None
    results = []
    if sdpa_ms is not None:
        results.append(dict(name=name + "_torch_sdpa", median_ms=sdpa_ms, tflops=flops / sdpa_ms / 1e9,
                            peak_share=flops / rate * 1e3 / sdpa_ms, roofline_ms=roofline_ms(bytes_moved, flops, rate),
                            **shape))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    default = kernel_for(attention_impl(), head_dim=d, causal=causal, batch=batch, q_heads=hq, kv_heads=hkv, queries=t,
                         max_prefix=prefix, window=window, num_sms=sms,
                         wgmma_block_m=_ext.require_cuda().attention_tile_shape(d, IMPLS["wgmma"])[0])
    for impl in IMPLS:
        if impl == "wgmma_deep" and d != 256:
            continue  # at head_dim 512 it is the wgmma kernel
        run = kernel(impl)
        try:
            run()
            rel = ((out[:1].float() - ref).abs().max() / ref.abs().max()).item()
            ms = median(time_cuda(run, warmup=3, iters=20))
        except RuntimeError as e:  # a kernel that fails to launch leaves the other rows
            print(f"{name}_{impl}: {e}")
            continue
        row = dict(median_ms=ms, tflops=flops / ms / 1e9, peak_share=flops / rate * 1e3 / ms,
                   speedup_vs_sdpa=None if sdpa_ms is None else sdpa_ms / ms, max_rel_err=rel,
                   roofline_ms=roofline_ms(bytes_moved, flops, rate), impl=impl, **shape)
        results.append(dict(name=f"{name}_{impl}", **row))
        if impl == default:
            results.append(dict(name=name, **row))
        for n in () if causal else splits:  # the split-KV count forced (the planner's choice is the row above)
            run = kernel(impl, n)
            try:
                run()
                ms = median(time_cuda(run, warmup=3, iters=20))
            except RuntimeError as e:
                print(f"{name}_{impl}_s{n}: {e}")
                continue
            results.append(dict(name=f"{name}_{impl}_s{n}", median_ms=ms, tflops=flops / ms / 1e9,
                                peak_share=flops / rate * 1e3 / ms, impl=impl, num_splits=n, **shape))
    return results


CASES = [
    # Targets (H100): decoder_sliding_p1023_b1 <= 0.040 ms; decoder_full_p32768_b1 >= 400 TFLOP/s;
    # encoder_causal_full_t4096_b1 >= 350 TFLOP/s.
    dict(name="decoder_sliding_p1023_b1", batch=1, d=256, hq=16, hkv=8, window=1024, ring=1023, prefix=1023, t=256,
         causal=False),
    dict(name="decoder_sliding_p1023_b4", batch=4, d=256, hq=16, hkv=8, window=1024, ring=1023, prefix=1023, t=256,
         causal=False),
    # The full layers at the prompt `dgemma bench` times (prefix 1024): where DGEMMA_ATTENTION=auto's hd512 threshold
    # is decided.
    dict(name="decoder_full_p1024_b1", batch=1, d=512, hq=16, hkv=2, window=None, ring=0, prefix=1024, t=256,
         causal=False),
    dict(name="decoder_full_p1024_b4", batch=4, d=512, hq=16, hkv=2, window=None, ring=0, prefix=1024, t=256,
         causal=False),
    dict(name="decoder_full_p4096_b1", batch=1, d=512, hq=16, hkv=2, window=None, ring=0, prefix=4096, t=256,
         causal=False),
    dict(name="decoder_full_p32768_b1", batch=1, d=512, hq=16, hkv=2, window=None, ring=0, prefix=32768, t=256,
         causal=False),
    dict(name="encoder_causal_sliding_t4096_b1", batch=1, d=256, hq=16, hkv=8, window=1024, ring=1023, prefix=0,
         t=4096, causal=True),
    dict(name="encoder_causal_full_t4096_b1", batch=1, d=512, hq=16, hkv=2, window=None, ring=0, prefix=0, t=4096,
         causal=True),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/attention.json")
    ap.add_argument("--splits", default="", help="also time the decoder cases at these forced split-KV counts, "
                    "e.g. 1,2,4,8 (rows {case}_{impl}_s{n})")
    ap.add_argument("--cases", default="", help="only the cases whose names contain one of these (comma-separated)")
    args = ap.parse_args()
    try:
        splits = tuple(int(x) for x in args.splits.split(",") if x.strip())
    except ValueError:
        ap.error(f"--splits takes comma-separated positive integers, got {args.splits!r}")
    if any(n <= 0 for n in splits):
        ap.error(f"--splits takes positive integers, got {args.splits!r}")
    wanted = [w for w in args.cases.split(",") if w.strip()]
    results = []
    for case in CASES:
        if wanted and not any(w in case["name"] for w in wanted):
            continue
        results += _case(**case, splits=splits)
    write_results(args.out, results)


if __name__ == "__main__":
    main()
