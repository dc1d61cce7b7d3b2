"""How exactly the FP8 GEMMs accumulate: ``linear_fp8`` against its correctly rounded reference.

The reference (``dgemma.quant.linear_reference``) quantises the activations as the kernel does and sums the E4M3
products exactly (fp64), then rounds once to bf16. A GEMM that accumulates in full fp32 lands on the same bf16 value
almost always (its rounding error, ~2^-24 sqrt(k) relative, rarely crosses a bf16 rounding boundary, 2^-9 apart); a
GEMM whose tensor-core accumulation keeps fewer bits (Hopper's FP8 wgmma without periodic promotion to fp32 keeps
about 14) differs in a fraction of outputs that grows with k. Prints, per k: the share of bf16 outputs that differ,
the largest difference in bf16 ulps, and the relative error. Usage (GPU)::

    python bench/fp8_gemm_precision.py --json fp8_precision.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of the last place of bf16 at b's magnitude (a and b bf16)."""
    bf = b.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    ulp = torch.exp2(torch.floor(torch.log2(bf)) - 7)
    return (a.float() - b.float()).abs() / ulp


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--ks", default="64,128,512,2816,8192")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("fp8_gemm_precision: needs a CUDA GPU", file=sys.stderr)
        return 2
    from dgemma.ops import cuda_moe
    from dgemma.quant import linear_reference, quantize_weight

    rows = []
    for k in (int(s) for s in args.ks.split(",")):
        g = torch.Generator(device="cuda").manual_seed(k)
        w = quantize_weight((torch.randn(args.n, k, device="cuda", generator=g) * k ** -0.5).bfloat16())
        x = torch.randn(args.rows, k, device="cuda", generator=g).bfloat16()
        out = cuda_moe.linear_fp8(x, w)
        ref = linear_reference(x, w)
        ulps = bf16_ulps(out, ref)
        row = {"k": k, "rows": args.rows, "n": args.n,
               "differ_share": (out != ref).float().mean().item(),
               "max_ulps": ulps.max().item(),
               "rel_err": ((out.double() - ref.double()).norm() / ref.double().norm()).item()}
        rows.append(row)
        print(f"k={k:5d}: {row['differ_share']:.4%} of bf16 outputs differ from the correctly rounded sum, "
              f"max {row['max_ulps']:.1f} ulp, relative error {row['rel_err']:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "commit": os.environ.get("DGEMMA_COMMIT", "unknown"), "command": " ".join(["python", *sys.argv]),
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
