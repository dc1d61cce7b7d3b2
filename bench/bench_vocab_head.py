"""Fused vocabulary head vs the transformers-style path, one denoising step at batch 1 and 4 (H100).

Usage: python bench/bench_vocab_head.py --out bench/results/vocab_head.json
The fused path reads E twice (statistics pass, P·E pass) and writes/reads the bf16 probabilities; the
transformers-style path is lm_head + softcap + fp32 softmax + multinomial + entropy + sort, on the same
inputs. max_rel_err compares the fused outputs (max, lse, entropy, soft) with the fp32 reference.

Rows: ``vocab_head_b{b}`` is the implementation generation runs (DGEMMA_VOCAB_HEAD, else the default, with the
self-conditioning precision of DGEMMA_VOCAB_HEAD_SOFT), ``vocab_head_{impl}_b{b}`` each implementation of the two
GEMMs, and ``vocab_head_wgmma_fp8soft_b{b}`` the wgmma GEMMs with the P·E product in FP8 (its ``max_rel_err``
against the FP8 pass's own reference, ``soft_err_vs_bf16`` against the bf16 product). ``flop_share``: the two
GEMMs' FLOPs at the bf16 matmul rate measured in this run (bench/common.py bf16_matmul_flops) over the median;
``speedup_vs_torch``: the transformers-style path's median over this one's, same run.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bf16_matmul_flops, median, roofline_ms, time_cuda, write_results  # noqa: E402

VOCAB, HIDDEN, CANVAS, CAP = 262144, 2816, 256, 30.0


def transformers_style(h, embed, temp, bound, canvas, gen):
    logits = F.linear(h, embed).float()
    logits = torch.tanh(logits / CAP) * CAP
    processed = logits / temp
    probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
    b, c, v = processed.shape
    cand = torch.multinomial(probs.view(-1, v), 1, generator=gen).view(b, c)
    argmax = processed.argmax(-1)
    entropy = torch.distributions.Categorical(logits=processed).entropy()
    sorted_e, order = torch.sort(entropy, dim=-1)
    sel = torch.cumsum(sorted_e, dim=-1) - sorted_e <= bound
    accepted = torch.scatter(torch.zeros_like(sel), -1, order, sel)
    noise = torch.randint(0, v, (b, c), generator=gen, device=h.device)
    return torch.where(accepted, cand, noise), argmax


def max_rel_err(out, h, embed, temp, embed_fp8=None) -> tuple[float, float]:
    """(largest relative error of the statistics and soft against their references, soft's relative error against
    the bf16 product): the soft reference is the FP8 pass's own where ``embed_fp8`` is given."""
    from dgemma.vocab_head import fp8_soft_embedding, head_statistics, processed_logits, soft_embedding

    z = processed_logits(h, embed, temp)
    ref = head_statistics(z)
    errs = [((getattr(out, a) - ref[k]).abs() / ref[k].abs().clamp_min(1e-3)).max().item()
            for a, k in (("max_logit", "max"), ("lse", "lse"), ("entropy", "entropy"))]
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    bf16 = soft_embedding(z, embed, HIDDEN**0.5)
    own = bf16 if embed_fp8 is None else fp8_soft_embedding(z, embed_fp8, HIDDEN**0.5)
    errs.append(rel(out.soft, own))
    return max(errs), rel(out.soft, bf16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/vocab_head.json")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--batches", default="1,4", help="canvases per call, comma-separated (default 1,4)")
    args = ap.parse_args()
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        ap.error(f"--batches {args.batches!r}: expected comma-separated positive integers")
    if not batches or min(batches) < 1:
        ap.error(f"--batches {args.batches!r}: expected comma-separated positive integers")
    from dgemma.ops.cuda_vocab_head import IMPLS, head_impl, soft_precision, vocab_head_step, workspace_bytes
    from dgemma.vocab_head import embedding_fp8

    torch.manual_seed(0)
    # Logit scale of a trained head: raw logits with a std of ~3 (E rows ~ N(0, 3²/H), h ~ N(0, 1)).
    embed = (torch.randn(VOCAB, HIDDEN, device="cuda") * (3.0 / HIDDEN**0.5)).to(torch.bfloat16)
    temp, bound, results = 0.6, 0.1, []
    rate = bf16_matmul_flops()
    default = head_impl(), soft_precision() == "fp8"
    embed_fp8 = embedding_fp8(embed)
    variants = [(impl, None, f"vocab_head_{impl}") for impl in IMPLS] + [("wgmma", embed_fp8,
                                                                           "vocab_head_wgmma_fp8soft")]
    for b in batches:
        h = torch.randn(b, CANVAS, HIDDEN, device="cuda").to(torch.bfloat16)
        canvas = torch.randint(0, VOCAB, (b, CANVAS), device="cuda")
        prev = torch.randint(0, VOCAB, (b, CANVAS), device="cuda")
        rows = b * CANVAS
        e_bytes = VOCAB * HIDDEN * 2
        bytes_moved = 2 * e_bytes + 2 * rows * VOCAB * 2 + 2 * rows * HIDDEN * 2
        flops = 2 * (2 * rows * VOCAB * HIDDEN)
        gen = torch.Generator(device="cuda").manual_seed(0)
        ms_tf = median(time_cuda(lambda: transformers_style(h, embed, temp, bound, canvas, gen), iters=args.iters))
        # lm_head reads E and writes bf16 logits; each fp32 pass over [rows, V] reads or writes 4 bytes/elt.
        results.append({"name": f"transformers_style_b{b}", "median_ms": ms_tf,
                        "roofline_ms": roofline_ms(e_bytes, 2 * rows * VOCAB * HIDDEN), "batch": b})
        torch.cuda.empty_cache()
        for impl, e8, name in variants:
            ws = torch.empty(workspace_bytes(b, CANVAS, VOCAB, HIDDEN, impl=impl, fp8_soft=e8 is not None),
                             dtype=torch.uint8, device="cuda")
            step = [0]

            def fused(ws=ws, impl=impl, e8=e8):
                step[0] += 1
                return vocab_head_step(h, embed, temp, 1234, step[0], canvas, prev, bound, workspace=ws, impl=impl,
                                       embed_fp8=e8)

            out = fused()
            err, soft_err = max_rel_err(out, h, embed, temp, e8)
            del out
            ms = median(time_cuda(fused, iters=args.iters))
            row = {"median_ms": ms, "roofline_ms": roofline_ms(bytes_moved, flops, rate), "max_rel_err": err,
                   "soft_err_vs_bf16": soft_err, "flop_share": flops / rate * 1e3 / ms, "speedup_vs_torch": ms_tf / ms,
                   "impl": impl, "soft_precision": "bf16" if e8 is None else "fp8", "batch": b, "canvas": CANVAS,
                   "vocab": VOCAB, "hidden": HIDDEN}
            results.append({"name": f"{name}_b{b}", **row})
            if (impl, e8 is not None) == default:
                results.append({"name": f"vocab_head_b{b}", **row})
            del ws
            torch.cuda.empty_cache()
    write_results(args.out, results)


if __name__ == "__main__":
    main()
