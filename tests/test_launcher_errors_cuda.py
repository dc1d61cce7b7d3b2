"""Every error path of every tensor entry point of ``dgemma._C``, repeated in one process.

A bad-input call into a CUDA launcher once killed the process (SIGSEGV while formatting the error
message inside the extension) instead of raising. This module builds, per entry point, a table of
calls that each differ from one known-good call in exactly one argument, and expects each to raise
the exception the launcher's validation documents (``std::invalid_argument`` -> ValueError) with a
message naming the bad argument or value. Each table is run 1,000 times; then the known-good call
itself runs, its result is checked (against a torch reference where that is cheap), and the device
is synchronised to show the CUDA context survived.

A few cases are rejected by pybind11 before the launcher runs (a Python value that does not convert
to the C++ scalar type): those are listed deliberately with TypeError. Arguments of two different
GPUs (``check_same_device`` between two CUDA devices) need a second GPU and are not covered; where a
launcher compares devices before checking for CUDA, a host tensor reaches that message instead.

Tensors are only made inside the tests (no CUDA work at import time).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

pytestmark = pytest.mark.gpu

# DGEMMA_ERROR_REPEATS: fewer rounds under compute-sanitizer (bench/device_check.sh), 1,000 otherwise.
REPEATS = int(os.environ.get("DGEMMA_ERROR_REPEATS", "1000"))
BF16, F32, FP8 = torch.bfloat16, torch.float32, torch.float8_e4m3fn
I32, I64, U8, BOOL = torch.int32, torch.int64, torch.uint8, torch.bool

# Every function of dgemma._C that takes tensors or sizes; the capability queries without arguments
# (version, built_with_cuda, cuda_runtime_version) have no error path.
OPS = (
    "rms_norm", "rms_norm_fp8", "residual_norm", "fp8_quantize_rows", "fp8_linear_workspace_bytes", "fp8_linear", "fp8_gated_mlp_workspace_bytes",
    "fp8_gated_mlp", "moe_route", "moe_plan", "moe_fp8_workspace_bytes", "moe_fp8", "moe_fp8_workspace_layout",
    "ffn_residual_experts", "embed_norm", "qkv_prep",
    "attention_tile_shape", "attention_forward", "vocab_head_workspace_bytes", "vocab_head_step",
    "device_capability",
)
NO_ERROR_PATH = {"version", "built_with_cuda", "cuda_runtime_version", "vocab_head_unsupported",
                 "attention_head_dim_supported", "moe_route_unsupported", "ffn_residual_experts_unsupported",
                 "moe_shared_experts_unsupported", "moe_plan_scratch_ints", "moe_gemm_tile"}


@dataclass
class Case:
    label: str
    kwargs: dict
    exc: type
    match: str  # regular expression searched in str(exception)


@dataclass
class Table:
    """The error cases of one entry point, its known-good arguments and a check of their result."""

    op: str
    base: dict
    cases: list[Case] = field(default_factory=list)
    check: Callable[[object], None] | None = None  # receives the known-good call's return value

    def bad(self, label: str, match: str, exc: type = ValueError, **changes) -> None:
        """A case: the known-good arguments with ``changes``; ``match`` is a literal substring."""
        self.add(label, re.escape(match), exc, **changes)

    def add(self, label: str, pattern: str, exc: type, **changes) -> None:
        unknown = set(changes) - set(self.base)
        assert not unknown, f"{self.op}: unknown arguments {unknown}"
        self.cases.append(Case(label, {**self.base, **changes}, exc, pattern))

    def type_error(self, label: str, bad_repr: str, **changes) -> None:
        """pybind11 rejects a scalar that does not convert before the launcher runs. The tensor arguments
        are None here so that formatting "Invoked with: ..." never prints (copies) a device tensor."""
        kwargs = {k: (None if _is_tensor(v) else v) for k, v in self.base.items()}
        kwargs.update(changes)
        self.cases.append(Case(label, kwargs, TypeError,
                               re.escape(f"{self.op}(): incompatible function arguments") + r"[\s\S]*"
                               + re.escape(bad_repr)))


def _positive_size(nbytes) -> None:
    """The known-good call of a *_workspace_bytes function returns a positive byte count."""
    assert isinstance(nbytes, int) and nbytes > 0


def _is_tensor(v) -> bool:
    return isinstance(v, torch.Tensor) or hasattr(v, "data_ptr")


class Ctx:
    """Where the tables' tensors live. ``host`` gives a host (CPU) copy for the wrong-device cases."""

    def __init__(self, lib, device: torch.device):
        self.lib = lib
        self.dev = device
        self.idx = device.index
        self.gen = torch.Generator(device=device).manual_seed(0)

    def host(self, t: torch.Tensor):
        return t.cpu()

    def workspace_bytes(self, op: str, *sizes) -> int:
        return int(getattr(self.lib, op)(*sizes, self.idx))

    def stream(self) -> int:
        return torch.cuda.current_stream(self.dev).cuda_stream

    # -- tensor makers -------------------------------------------------------------------------

    def empty(self, *shape, dtype=BF16) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.dev)

    def randn(self, *shape, dtype=BF16, scale=1.0) -> torch.Tensor:
        return (torch.randn(shape, generator=self.gen, device=self.dev) * scale).to(dtype)

    def misaligned(self, *shape, dtype=BF16, offset=1) -> torch.Tensor:
        """A contiguous view starting ``offset`` elements into its storage (not 16-byte aligned)."""
        n = 1
        for s in shape:
            n *= s
        return torch.empty(n + offset, dtype=dtype, device=self.dev)[offset:].view(shape)

    def transposed(self, rows, cols, dtype=BF16) -> torch.Tensor:
        """A [rows, cols] view with strides [1, rows] (last dimension not contiguous)."""
        return torch.empty(cols, rows, dtype=dtype, device=self.dev).t()

    def strided_vector(self, n, dtype=BF16) -> torch.Tensor:
        return torch.empty(2 * n, dtype=dtype, device=self.dev)[::2]

    def padded_rows(self, rows, cols, pad, dtype=BF16) -> torch.Tensor:
        """[rows, cols] whose rows are ``cols + pad`` elements apart (last dimension contiguous)."""
        return torch.empty(rows, cols + pad, dtype=dtype, device=self.dev)[:, :cols]


def cuda_msg(name: str) -> str:
    return f"{name} must be a CUDA tensor, got a CPU tensor"


def not_tensor(name: str, what: str = "NoneType") -> str:
    return f"{name} must be a torch.Tensor, got <class '{what}'>"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


# -- rms_norm ------------------------------------------------------------------------------------


def rms_norm_table(c: Ctx) -> Table:
    from dgemma.ops.reference import ReferenceOps

    x = c.randn(6, 512, scale=3.0)
    w = (torch.rand(512, generator=c.gen, device=c.dev) + 0.5).to(BF16)
    t = Table("rms_norm", dict(x=x, weight=w, out=c.empty(6, 512), eps=1e-6, stream=0))
    # Order of the checks in csrc/ops/rms_norm.cu.
    t.bad("x on the host", cuda_msg("x"), x=c.host(x))
    t.bad("out on the host", cuda_msg("out"), out=c.host(t.base["out"]))
    t.bad("out dtype differs from x", "out has dtype float32, expected bfloat16 (the dtype of x)",
          out=c.empty(6, 512, dtype=F32))
    t.bad("0-d x", "x must have at least one dimension", x=c.empty(), out=c.empty())
    t.bad("out shape differs from x", "out has shape [6, 256], expected [6, 512]", out=c.empty(6, 256))
    t.bad("empty last dimension", "x last dimension 0 must be in [1, 1048576]", x=c.empty(6, 0), out=c.empty(6, 0),
          weight=None)
    t.bad("last dimension too large", "x last dimension 1048577 must be in [1, 1048576]", x=c.empty(1, 2**20 + 1),
          out=c.empty(1, 2**20 + 1), weight=None)
    t.bad("eps zero", "eps must be positive, got 0.000000", eps=0.0)
    t.bad("eps negative", "eps must be positive, got -0.000001", eps=-1e-6)
    t.add("eps NaN", re.escape("eps must be positive, got ") + "-?nan", ValueError, eps=float("nan"))
    t.bad("weight on the host", cuda_msg("weight"), weight=c.host(w))
    t.bad("weight dtype", "weight has dtype float32, expected bfloat16 (the dtype of x)",
          weight=c.empty(512, dtype=F32))
    t.bad("weight 2-d", "weight has shape [1, 512], expected 1 dimensions", weight=c.empty(1, 512))
    t.bad("weight length", "weight has shape [256], expected size 512 in dimension 0 (the normalised dimension)",
          weight=c.empty(256))
    t.bad("weight strided", "weight must be contiguous (shape [512])", weight=c.strided_vector(512))
    t.bad("x last dimension strided", "x must be contiguous in its last dimension",
          x=c.empty(6, 1024)[:, ::2])
    t.bad("x rows not evenly strided",
          "x (shape [4, 9, 4, 32]) must have uniformly strided rows; call .contiguous() first",
          x=c.empty(4, 9, 6, 32)[:, :, 1:5], out=c.empty(4, 9, 4, 32), weight=c.empty(32))
    t.bad("out last dimension strided", "out must be contiguous in its last dimension", out=c.empty(6, 1024)[:, ::2])
    # dtype support is checked last (after cudaSetDevice), still before any launch.
    t.bad("float16", "x has dtype float16, expected float32 or bfloat16", x=c.empty(6, 512, dtype=torch.float16),
          out=c.empty(6, 512, dtype=torch.float16), weight=None)
    t.bad("int32", "x has dtype int32, expected float32 or bfloat16", x=c.empty(6, 512, dtype=I32),
          out=c.empty(6, 512, dtype=I32), weight=None)
    t.bad("x is None", not_tensor("x"), x=None)
    t.bad("out is None", not_tensor("out"), out=None)
    t.bad("weight is a list", not_tensor("weight", "list"), weight=[1.0] * 512)
    t.type_error("eps is a string", "eps='1e-6'", eps="1e-6")
    t.type_error("eps is None", "eps=None", eps=None)
    t.type_error("negative stream handle", "stream=-1", stream=-1)

    def check(_):
        out = t.base["out"]
        ref = ReferenceOps().rms_norm(x, w, 1e-6)
        assert torch.isfinite(out.float()).all()
        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)

    t.check = check
    return t


def rms_norm_fp8_table(c: Ctx) -> Table:
    from dgemma import quant
    from dgemma.ops.reference import ReferenceOps

    rows, d = 6, 512
    x = c.randn(rows, d, scale=3.0)
    w = (torch.rand(d, generator=c.gen, device=c.dev) + 0.5).to(BF16)
    t = Table("rms_norm_fp8", dict(x=x, weight=w, q=c.empty(rows, d, dtype=FP8), scale=c.empty(rows, dtype=F32),
                                   eps=1e-6, stream=0))
    # Order of the checks in csrc/ops/rms_norm.cu (rms_norm_fp8).
    t.bad("x on the host", cuda_msg("x"), x=c.host(x))
    t.bad("x float32", "x has dtype float32, expected bfloat16", x=c.empty(rows, d, dtype=F32))
    t.bad("0-d x", "x must have at least one dimension", x=c.empty())
    t.bad("empty last dimension", "x last dimension 0 must be in [1, 1048576]", x=c.empty(rows, 0))
    t.bad("eps zero", "eps must be positive, got 0.000000", eps=0.0)
    t.bad("x last dimension strided", "x must be contiguous in its last dimension", x=c.empty(rows, 2 * d)[:, ::2])
    t.bad("weight on the host", cuda_msg("weight"), weight=c.host(w))
    t.bad("weight dtype", "weight has dtype float32, expected bfloat16 (the dtype of x)", weight=c.empty(d, dtype=F32))
    t.bad("weight length", "weight has shape [256], expected size 512 in dimension 0 (the normalised dimension)",
          weight=c.empty(256))
    t.bad("q on the host", cuda_msg("q"), q=c.host(t.base["q"]))
    t.bad("q dtype", "q has dtype bfloat16, expected float8_e4m3fn", q=c.empty(rows, d))
    t.bad("q 3-d", f"q has shape [1, {rows}, {d}], expected 2 dimensions", q=c.empty(1, rows, d, dtype=FP8))
    t.bad("q rows", f"q has shape [3, {d}], expected size {rows} in dimension 0 (rows of x)",
          q=c.empty(3, d, dtype=FP8))
    t.bad("q columns", f"q has shape [{rows}, 256], expected size {d} in dimension 1 (the normalised dimension)",
          q=c.empty(rows, 256, dtype=FP8))
    t.bad("q strided", f"q must be contiguous (shape [{rows}, {d}])", q=c.empty(rows, 2 * d, dtype=FP8)[:, ::2])
    t.bad("scale on the host", cuda_msg("scale"), scale=c.host(t.base["scale"]))
    t.bad("scale dtype", "scale has dtype bfloat16, expected float32", scale=c.empty(rows))
    t.bad("scale length", f"scale has shape [5], expected size {rows} in dimension 0 (rows of x)",
          scale=c.empty(5, dtype=F32))
    t.bad("scale strided", f"scale must be contiguous (shape [{rows}])", scale=c.strided_vector(rows, dtype=F32))
    t.bad("x is None", not_tensor("x"), x=None)
    t.bad("q is None", not_tensor("q"), q=None)
    t.type_error("eps is a string", "eps='1e-6'", eps="1e-6")

    def check(_):
        # Bit-identical to the reference norm followed by the reference quantisation.
        rq, rs = quant.quantize_rows(ReferenceOps().rms_norm(x, w, 1e-6))
        assert torch.equal(t.base["q"].view(U8), rq.view(U8)) and torch.equal(t.base["scale"], rs)

    t.check = check
    return t


# -- FP8 quantisation, linear and gated MLP -----------------------------------------------------------


def residual_norm_table(c: Ctx) -> Table:
    from dgemma.ops.reference import ReferenceOps

    x, a, b = c.randn(6, 512), c.randn(6, 512, scale=3.0), c.randn(6, 512, scale=2.0)
    wa, wb, wc = ((torch.rand(512, generator=c.gen, device=c.dev) + 0.5).to(BF16) for _ in range(3))
    scalar = torch.full((1,), 0.75, dtype=BF16, device=c.dev)
    t = Table("residual_norm", dict(x=x, a=a, b=b, wa=wa, wb=wb, wc=wc, scalar=scalar, out=c.empty(6, 512),
                                    eps=1e-6, stream=0, q_weight=None, q=None, q_scale=None))
    # Order of the checks in csrc/ops/rms_norm.cu (residual_norm).
    t.bad("x on the host", cuda_msg("x"), x=c.host(x))
    t.bad("x float16", "x has dtype float16, expected float32 or bfloat16", x=c.empty(6, 512, dtype=torch.float16))
    t.bad("0-d x", "x must have at least one dimension", x=c.empty())
    t.bad("x transposed", "x must be contiguous (shape [6, 512])", x=c.transposed(6, 512))
    t.bad("a on the host", cuda_msg("a"), a=c.host(a))
    t.bad("a dtype", "a has dtype float32, expected bfloat16 (the dtype of x)", a=c.empty(6, 512, dtype=F32))
    t.bad("a shape", "a has shape [6, 256], expected [6, 512] (as x)", a=c.empty(6, 256))
    t.bad("out shape", "out has shape [3, 512], expected [6, 512] (as x)", out=c.empty(3, 512))
    t.bad("empty last dimension", "x last dimension 0 must be in [1, 1048576]", x=c.empty(6, 0), a=c.empty(6, 0),
          out=c.empty(6, 0))
    t.bad("eps zero", "eps must be positive, got 0.000000", eps=0.0)
    t.bad("wa length", "wa has shape [256], expected size 512 in dimension 0 (the normalised dimension)",
          wa=c.empty(256))
    t.bad("wa on the host", cuda_msg("wa"), wa=c.host(wa))
    t.bad("b without the rest", "b, wb, wc and scalar must be given together (or none of them)", wb=None)
    t.bad("scalar without b", "b, wb, wc and scalar must be given together (or none of them)", b=None, wb=None,
          wc=None)
    t.bad("b shape", "b has shape [6, 511], expected [6, 512] (as x)", b=c.empty(6, 511))
    t.bad("wc dtype", "wc has dtype float32, expected bfloat16 (the dtype of x)", wc=c.empty(512, dtype=F32))
    t.bad("scalar two elements", "scalar has shape [2], expected one element", scalar=c.empty(2))
    t.bad("scalar on the host", cuda_msg("scalar"), scalar=c.host(scalar))
    t.bad("x is None", not_tensor("x"), x=None)
    t.bad("in place", "out must not overlap x (the kernel reads it after writing out)", out=x)
    t.bad("out is b", "out must not overlap b (the kernel reads it after writing out)", out=b)
    t.type_error("eps is a string", "eps='1e-6'", eps="1e-6")
    # The quantised output of the first form (the next GEMM's input).
    add = dict(b=None, wb=None, wc=None, scalar=None)
    q, qs = c.empty(6, 512, dtype=FP8), c.empty(6, dtype=F32)
    t.bad("q without q_scale", "q and q_scale must be given together (q_weight with them, or neither)", q=q)
    t.bad("q_weight alone", "q and q_scale must be given together (q_weight with them, or neither)", q_weight=wa)
    t.bad("q with float32 rows", "x has dtype float32: q needs bfloat16", x=c.empty(6, 512, dtype=F32),
          a=c.empty(6, 512, dtype=F32), wa=c.empty(512, dtype=F32), out=c.empty(6, 512, dtype=F32), q=q, q_scale=qs,
          **add)
    t.bad("q_weight length", "q_weight has shape [256], expected size 512 in dimension 0 (the normalised dimension)",
          q_weight=c.empty(256), q=q, q_scale=qs, **add)
    t.bad("q dtype", "q has dtype bfloat16, expected float8_e4m3fn", q=c.empty(6, 512), q_scale=qs, **add)
    t.bad("q rows", "q has shape [3, 512], expected size 6 in dimension 0 (rows of x)", q=c.empty(3, 512, dtype=FP8),
          q_scale=qs, **add)
    t.bad("q_scale length", "q_scale has shape [5], expected size 6 in dimension 0 (rows of x)", q=q,
          q_scale=c.empty(5, dtype=F32), **add)
    t.bad("q on the host", cuda_msg("q"), q=c.host(q), q_scale=qs, **add)

    def check(_):
        from dgemma import quant

        # The first form with its quantised output: bit-identical to the reference norm then quantisation of out.
        out, q, qs = c.empty(6, 512), c.empty(6, 512, dtype=FP8), c.empty(6, dtype=F32)
        c.lib.residual_norm(x, a, None, wa, None, None, None, out, 1e-6, c.stream(), wb, q, qs)
        torch.testing.assert_close(out.float(), ReferenceOps().add_rms_norm(x, a, wa, 1e-6).float(), rtol=2e-2,
                                   atol=2e-2)
        rq, rs = quant.quantize_rows(ReferenceOps().rms_norm(out, wb, 1e-6))
        assert torch.equal(q.view(U8), rq.view(U8)) and torch.equal(qs, rs)
        # The second form with its quantised output (the next layer's q/k/v input), the same way.
        c.lib.residual_norm(x, a, b, wa, wb, wc, scalar, out, 1e-6, c.stream(), wa, q, qs)
        rq, rs = quant.quantize_rows(ReferenceOps().rms_norm(out, wa, 1e-6))
        assert torch.equal(q.view(U8), rq.view(U8)) and torch.equal(qs, rs)
        ref = ReferenceOps().ffn_residual(x, a, b, wa, wb, wc, scalar, 1e-6)
        torch.testing.assert_close(t.base["out"].float(), ref.float(), rtol=2e-2, atol=2e-2)

    t.check = check
    return t


def fp8_quantize_rows_table(c: Ctx) -> Table:
    from dgemma import quant

    rows, cols = 8, 512
    x = c.randn(rows, cols, scale=4.0)
    t = Table("fp8_quantize_rows", dict(x=x, q=c.empty(rows, cols, dtype=FP8), scale=c.empty(rows, dtype=F32),
                                        stream=0))
    dev = f"expected cuda:{c.idx} (the device of x)"
    t.bad("x on the host", cuda_msg("x"), x=c.host(x))
    t.bad("x float32", "x has dtype float32, expected bfloat16", x=c.empty(rows, cols, dtype=F32))
    t.bad("x 3-d", "x has shape [2, 4, 512], expected 2 dimensions", x=c.empty(2, 4, cols))
    t.bad("x last dimension strided", "x must be contiguous in its last dimension", x=c.empty(rows, 2 * cols)[:, ::2])
    t.bad("columns not a multiple of 16", "x last dimension is 24, expected a positive multiple of 16",
          x=c.empty(rows, 24))
    t.bad("no columns", "x last dimension is 0, expected a positive multiple of 16", x=c.empty(rows, 0))
    t.bad("too many columns", "x last dimension 8208 exceeds 8192", x=c.empty(rows, 8208))
    t.bad("row stride not a multiple of 8", "x row stride is 516, expected a positive multiple of 8",
          x=c.padded_rows(rows, cols, 4))
    t.bad("x misaligned", "x must be 16-byte aligned", x=c.misaligned(rows, cols))
    t.bad("q on the host", f"q is on cuda:-1, {dev}", q=c.host(t.base["q"]))
    t.bad("q dtype", "q has dtype bfloat16, expected float8_e4m3fn", q=c.empty(rows, cols))
    t.bad("q 1-d", f"q has shape [{rows * cols}], expected 2 dimensions", q=c.empty(rows * cols, dtype=FP8))
    t.bad("q rows", "q has shape [4, 512], expected size 8 in dimension 0 (rows of x)", q=c.empty(4, cols, dtype=FP8))
    t.bad("q columns", "q has shape [8, 256], expected size 512 in dimension 1 (columns of x)",
          q=c.empty(rows, 256, dtype=FP8))
    t.bad("q transposed", "q must be contiguous (shape [8, 512])", q=c.transposed(rows, cols, dtype=FP8))
    t.bad("q misaligned", "q must be 16-byte aligned", q=c.misaligned(rows, cols, dtype=FP8))
    t.bad("scale on the host", f"scale is on cuda:-1, {dev}", scale=c.host(t.base["scale"]))
    t.bad("scale dtype", "scale has dtype bfloat16, expected float32", scale=c.empty(rows))
    t.bad("scale 2-d", "scale has shape [8, 1], expected 1 dimensions", scale=c.empty(rows, 1, dtype=F32))
    t.bad("scale length", "scale has shape [4], expected size 8 in dimension 0 (rows of x)",
          scale=c.empty(4, dtype=F32))
    t.bad("scale strided", "scale must be contiguous (shape [8])", scale=c.strided_vector(rows, dtype=F32))
    t.bad("scale is None", not_tensor("scale"), scale=None)
    t.bad("x is a float", not_tensor("x", "float"), x=1.0)
    t.type_error("stream is a float", "stream=0.5", stream=0.5)

    def check(_):
        # Up to an ulp of the scale: a division by the Python number 448 on the GPU (instead of an IEEE
        # tensor division, as the kernel does) is one ulp off for some rows; test_moe_cuda checks bits.
        q_ref, s_ref = quant.quantize_rows(x)
        torch.testing.assert_close(t.base["scale"], s_ref, rtol=2.5e-7, atol=0)
        same = (t.base["q"].view(U8) == q_ref.view(U8)).float().mean().item()
        assert same >= 0.99, f"{same:.4f} of the FP8 values agree with quant.quantize_rows"

    t.check = check
    return t


def _fp8_weight(c: Ctx, n: int, k: int):
    from dgemma.quant import quantize_weight

    return quantize_weight(c.randn(n, k, scale=k ** -0.5))


def _workspace_errors(t: Table, c: Ctx, nbytes: int, name: str = "workspace", hint: str = "") -> None:
    """check_workspace (moe_checks.h) / the vocab head's own: CUDA, uint8, contiguous, 256-byte aligned, size."""
    t.bad("workspace on the host", cuda_msg(name), workspace=c.host(c.empty(16, dtype=U8)))
    t.bad("workspace dtype", f"{name} has dtype float32, expected uint8", workspace=c.empty(nbytes, dtype=F32))
    t.bad("workspace strided", f"{name} must be contiguous (shape [{nbytes}])",
          workspace=c.strided_vector(nbytes, dtype=U8))
    t.bad("workspace misaligned", f"{name} must be 256-byte aligned",
          workspace=c.misaligned(nbytes, dtype=U8, offset=16))
    t.bad("workspace too small", f"{name} has {nbytes - 1} bytes, expected at least {nbytes}{hint}",
          workspace=c.empty(nbytes - 1, dtype=U8))
    t.bad("workspace is None", not_tensor(name), workspace=None)


def _weight_errors(t: Table, c: Ctx, q_key: str, s_key: str, name: str, n: int, k: int) -> None:
    """check_weight (fp8_linear.cu) of an [n, k] FP8 weight named ``name``.q / ``name``.scale."""
    q, s = f"{name}.q", f"{name}.scale"
    t.bad(f"{q} on the host", cuda_msg(q), **{q_key: c.host(t.base[q_key])})
    t.bad(f"{q} dtype", f"{q} has dtype bfloat16, expected float8_e4m3fn", **{q_key: c.empty(n, k)})
    t.bad(f"{q} 3-d", f"{q} has shape [1, {n}, {k}], expected 2 dimensions", **{q_key: c.empty(1, n, k, dtype=FP8)})
    t.bad(f"{q} input features", f"{q} has shape [{n}, {k + 16}], expected size {k} in dimension 1 (input features)",
          **{q_key: c.empty(n, k + 16, dtype=FP8)})
    t.bad(f"{q} transposed", f"{q} must be contiguous (shape [{n}, {k}])", **{q_key: c.transposed(n, k, dtype=FP8)})
    t.bad(f"{q} misaligned", f"{q} must be 16-byte aligned", **{q_key: c.misaligned(n, k, dtype=FP8)})
    t.bad(f"{s} on the host", cuda_msg(s), **{s_key: c.host(t.base[s_key])})
    t.bad(f"{s} dtype", f"{s} has dtype bfloat16, expected float32", **{s_key: c.empty(n)})
    t.bad(f"{s} 2-d", f"{s} has shape [{n}, 1], expected 1 dimensions", **{s_key: c.empty(n, 1, dtype=F32)})
    t.bad(f"{s} length", f"{s} has shape [{n // 2}], expected size {n} in dimension 0 (rows of the weight)",
          **{s_key: c.empty(n // 2, dtype=F32)})
    t.bad(f"{s} strided", f"{s} must be contiguous (shape [{n}])", **{s_key: c.strided_vector(n, dtype=F32)})
    t.bad(f"{s} misaligned", f"{s} must be 16-byte aligned", **{s_key: c.misaligned(n, dtype=F32)})
    t.bad(f"{q} is None", not_tensor(q), **{q_key: None})


def _activation_errors(t: Table, c: Ctx, rows: int, k: int) -> None:
    """check_gemm_input (fp8_linear.cu) of x [rows, k]: bf16 (check_activation), or FP8 with x_scale."""
    t.bad("x FP8 without x_scale", "x is float8_e4m3fn: pass its per-row scales as x_scale",
          x=c.empty(rows, k, dtype=FP8))
    t.bad("x_scale with a bf16 x", "x has dtype bfloat16, expected float8_e4m3fn", x_scale=c.empty(rows, dtype=F32))
    xq = c.empty(rows, k, dtype=FP8)
    t.bad("FP8 x transposed", f"x must be contiguous (shape [{rows}, {k}])", x=c.transposed(rows, k, dtype=FP8),
          x_scale=c.empty(rows, dtype=F32))
    t.bad("x_scale on the host", cuda_msg("x_scale"), x=xq, x_scale=c.host(c.empty(rows, dtype=F32)))
    t.bad("x_scale dtype", "x_scale has dtype bfloat16, expected float32", x=xq, x_scale=c.empty(rows))
    t.bad("x_scale length", f"x_scale has shape [{rows - 1}], expected size {rows} in dimension 0 (rows of x)", x=xq,
          x_scale=c.empty(rows - 1, dtype=F32))
    t.bad("x on the host", cuda_msg("x"), x=c.host(t.base["x"]))
    t.bad("x float32", "x has dtype float32, expected bfloat16", x=c.empty(rows, k, dtype=F32))
    t.bad("x 1-d", f"x has shape [{rows * k}], expected 2 dimensions", x=c.empty(rows * k))
    t.bad("x last dimension strided", "x must be contiguous in its last dimension", x=c.empty(rows, 2 * k)[:, ::2])
    t.bad("x misaligned", "x must be 16-byte aligned", x=c.misaligned(rows, k))
    t.bad("x row stride", f"x row stride is {k + 4}, expected a positive multiple of 8", x=c.padded_rows(rows, k, 4))


def fp8_linear_workspace_bytes_table(c: Ctx) -> Table:
    t = Table("fp8_linear_workspace_bytes", dict(rows=8, n_out=2048, k=512, device=c.idx))
    msg = "fp8_linear_workspace_bytes: invalid sizes"
    t.bad("negative rows", msg, rows=-1)
    t.bad("no outputs", msg, n_out=0)
    t.bad("no inputs", msg, k=0)
    t.type_error("n_out beyond int", "n_out=1099511627776", n_out=2**40)

    t.check = _positive_size
    return t


def fp8_linear_table(c: Ctx) -> Table:
    rows, n, k = 8, 2048, 512
    w = _fp8_weight(c, n, k)
    x = c.randn(rows, k)
    nbytes = c.workspace_bytes("fp8_linear_workspace_bytes", rows, n, k)
    t = Table("fp8_linear", dict(x=x, w_q=w.q, w_scale=w.scale, out=c.empty(rows, n),
                                 workspace=c.empty(nbytes, dtype=U8), stream=0, x_scale=None))
    _activation_errors(t, c, rows, k)
    t.bad("x columns differ from the weight", f"weight.q has shape [{n}, {k}], expected size {k // 2} in dimension 1 "
          "(input features)", x=c.empty(rows, k // 2))
    _weight_errors(t, c, "w_q", "w_scale", "weight", n, k)
    t.bad("weight rows not a multiple of 8", "weight.q rows (output features) is 12, expected a positive multiple of 8",
          w_q=c.empty(12, k, dtype=FP8), w_scale=c.empty(12, dtype=F32))
    dev = f"expected cuda:{c.idx} (the device of x)"
    t.bad("out on the host", f"out is on cuda:-1, {dev}", out=c.host(t.base["out"]))
    t.bad("out dtype", "out has dtype float32, expected bfloat16", out=c.empty(rows, n, dtype=F32))
    t.bad("out rows", f"out has shape [4, {n}], expected size {rows} in dimension 0 (rows of x)", out=c.empty(4, n))
    t.bad("out columns", f"out has shape [{rows}, 16], expected size {n} in dimension 1 (output features)",
          out=c.empty(rows, 16))
    t.bad("out transposed", f"out must be contiguous (shape [{rows}, {n}])", out=c.transposed(rows, n))
    t.bad("out misaligned", "out must be 16-byte aligned", out=c.misaligned(rows, n))
    _workspace_errors(t, c, nbytes)
    t.type_error("stream is a string", "stream='0'", stream="0")

    def check(_):
        out = t.base["out"]
        assert torch.isfinite(out.float()).all()
        assert rel_err(out, x.float() @ w.dequantize().t()) <= 3e-2

    t.check = check
    return t


def fp8_gated_mlp_workspace_bytes_table(c: Ctx) -> Table:
    t = Table("fp8_gated_mlp_workspace_bytes", dict(rows=8, hidden=512, inter=512, device=c.idx))
    msg = "fp8_gated_mlp_workspace_bytes: invalid sizes"
    t.bad("negative rows", msg, rows=-5)
    t.bad("no hidden", msg, hidden=0)
    t.bad("negative intermediate", msg, inter=-512)
    t.type_error("rows is a float", "rows=8.0", rows=8.0)

    t.check = _positive_size
    return t


def fp8_gated_mlp_table(c: Ctx) -> Table:
    from dgemma.ops.reference import ReferenceOps

    rows, h, inter = 8, 512, 512
    gate, up, down = _fp8_weight(c, inter, h), _fp8_weight(c, inter, h), _fp8_weight(c, h, inter)
    x = c.randn(rows, h)
    nbytes = c.workspace_bytes("fp8_gated_mlp_workspace_bytes", rows, h, inter)
    t = Table("fp8_gated_mlp", dict(x=x, gate_q=gate.q, gate_scale=gate.scale, up_q=up.q, up_scale=up.scale,
                                    down_q=down.q, down_scale=down.scale, out=c.empty(rows, h),
                                    workspace=c.empty(nbytes, dtype=U8), stream=0, x_scale=None))
    _activation_errors(t, c, rows, h)
    _weight_errors(t, c, "gate_q", "gate_scale", "gate", inter, h)
    t.bad("intermediate not a multiple of 16", "gate.q rows (intermediate) is 40, expected a positive multiple of 16",
          gate_q=c.empty(40, h, dtype=FP8), gate_scale=c.empty(40, dtype=F32))
    t.bad("intermediate too large", "gate.q has 4112 rows, expected at most 4096",
          gate_q=c.empty(4112, h, dtype=FP8), gate_scale=c.empty(4112, dtype=F32))
    _weight_errors(t, c, "up_q", "up_scale", "up", inter, h)
    t.bad("up rows differ from gate", f"up.q has shape [256, {h}], expected size {inter} in dimension 0 "
          "(intermediate (rows of gate))", up_q=c.empty(256, h, dtype=FP8), up_scale=c.empty(256, dtype=F32))
    _weight_errors(t, c, "down_q", "down_scale", "down", h, inter)
    t.bad("down rows differ from hidden", f"down.q has shape [256, {inter}], expected size {h} in dimension 0 (hidden)",
          down_q=c.empty(256, inter, dtype=FP8), down_scale=c.empty(256, dtype=F32))
    dev = f"expected cuda:{c.idx} (the device of x)"
    t.bad("out on the host", f"out is on cuda:-1, {dev}", out=c.host(t.base["out"]))
    t.bad("out dtype", "out has dtype float32, expected bfloat16", out=c.empty(rows, h, dtype=F32))
    t.bad("out shape", f"out has shape [{rows}, 256], expected size {h} in dimension 1 (hidden)",
          out=c.empty(rows, 256))
    t.bad("out misaligned", "out must be 16-byte aligned", out=c.misaligned(rows, h))
    _workspace_errors(t, c, nbytes)

    def check(_):
        out = t.base["out"]
        assert torch.isfinite(out.float()).all()
        # two per-token E4M3 quantisations in a row (x, then the gelu·up intermediate): ~4.6 % against fp32
        assert rel_err(out, ReferenceOps().gated_mlp(x.float(), gate, up, down)) <= 6e-2

    t.check = check
    return t


# -- MoE: router, dispatch plan, FP8 experts -------------------------------------------------------------

N_TOK, HID, EXP, TOPK, MOE_I = 8, 512, 32, 8, 128


def _routing(c: Ctx):
    ids = torch.rand(N_TOK, EXP, generator=c.gen, device=c.dev).argsort(dim=1)[:, :TOPK].int().contiguous()
    w = torch.rand(N_TOK, TOPK, generator=c.gen, device=c.dev) + 0.1
    return ids, (w / w.sum(1, keepdim=True)).contiguous()


def moe_route_table(c: Ctx) -> Table:
    x = c.randn(N_TOK, HID, scale=3.0)
    proj = c.randn(EXP, HID, scale=HID ** -0.5 * 8)
    t = Table("moe_route", dict(x=x, scale=(1 + 0.1 * torch.randn(HID, generator=c.gen, device=c.dev)).to(BF16),
                                proj=proj,
                                expert_scale=(1 + 0.2 * torch.rand(EXP, generator=c.gen, device=c.dev)).to(BF16),
                                top_k=TOPK, eps=1e-6, weights=c.empty(N_TOK, TOPK, dtype=F32),
                                ids=c.empty(N_TOK, TOPK, dtype=I32), stream=0, residual_y=None, residual_w=None,
                                residual_out=None))
    dev = f"expected cuda:{c.idx} (the device of x)"
    # The fused attention residual: all three tensors or none.
    ry, rw, ro = c.randn(N_TOK, HID), c.randn(HID), c.empty(N_TOK, HID)
    together = "residual_y, residual_w and residual_out go together"
    t.bad("residual_y alone", together, residual_y=ry)
    t.bad("residual without out", together, residual_y=ry, residual_w=rw)
    t.bad("residual_y tokens", f"residual_y has shape [4, {HID}], expected size {N_TOK} in dimension 0 (tokens)",
          residual_y=c.empty(4, HID), residual_w=rw, residual_out=ro)
    t.bad("residual_y dtype", "residual_y has dtype float32, expected bfloat16", residual_y=c.empty(N_TOK, HID, dtype=F32),
          residual_w=rw, residual_out=ro)
    t.bad("residual_w length", f"residual_w has shape [256], expected size {HID} in dimension 0 (hidden)",
          residual_y=ry, residual_w=c.empty(256), residual_out=ro)
    t.bad("residual_out on the host", f"residual_out is on cuda:-1, {dev}", residual_y=ry, residual_w=rw,
          residual_out=c.host(ro))
    t.bad("residual_out aliases x", "residual_out must not alias x or residual_y", residual_y=ry, residual_w=rw,
          residual_out=x)
    both = c.randn(N_TOK + 1, HID)
    t.bad("residual_out overlaps x by a row", "residual_out must not alias x or residual_y", x=both[:N_TOK],
          residual_y=ry, residual_w=rw, residual_out=both[1:])
    t.bad("residual_out misaligned", "residual_out must be 16-byte aligned", residual_y=ry, residual_w=rw,
          residual_out=c.misaligned(N_TOK, HID))
    t.bad("residual with strided x", f"x must be contiguous (shape [{N_TOK}, {HID}])", x=c.padded_rows(N_TOK, HID, 8),
          residual_y=ry, residual_w=rw, residual_out=ro)
    t.bad("x on the host", cuda_msg("x"), x=c.host(x))
    t.bad("x float32", "x has dtype float32, expected bfloat16", x=c.empty(N_TOK, HID, dtype=F32))
    t.bad("x 3-d", f"x has shape [1, {N_TOK}, {HID}], expected 2 dimensions", x=c.empty(1, N_TOK, HID))
    t.bad("x last dimension strided", "x must be contiguous in its last dimension", x=c.empty(N_TOK, 2 * HID)[:, ::2])
    t.bad("hidden not a multiple of 8", "x last dimension (hidden) is 12, expected a positive multiple of 8",
          x=c.empty(N_TOK, 12))
    t.bad("x row stride", f"x row stride is {HID + 4}, expected a positive multiple of 8",
          x=c.padded_rows(N_TOK, HID, 4))
    t.bad("x misaligned", "x must be 16-byte aligned", x=c.misaligned(N_TOK, HID))
    t.bad("proj on the host", cuda_msg("proj"), proj=c.host(proj))
    t.bad("proj dtype", "proj has dtype float32, expected bfloat16", proj=c.empty(EXP, HID, dtype=F32))
    t.bad("proj 3-d", f"proj has shape [1, {EXP}, {HID}], expected 2 dimensions", proj=c.empty(1, EXP, HID))
    t.bad("proj hidden", f"proj has shape [{EXP}, 256], expected size {HID} in dimension 1 (hidden)",
          proj=c.empty(EXP, 256))
    t.bad("proj row slice", f"proj must be contiguous (shape [{EXP}, {HID}])", proj=c.padded_rows(EXP, HID, HID))
    t.bad("proj misaligned", "proj must be 16-byte aligned", proj=c.misaligned(EXP, HID))
    t.bad("16 experts", "proj has 16 experts (rows), expected a multiple of 32 up to 256", proj=c.empty(16, HID))
    t.bad("48 experts", "proj has 48 experts (rows), expected a multiple of 32 up to 256", proj=c.empty(48, HID))
    t.bad("288 experts", "proj has 288 experts (rows), expected a multiple of 32 up to 256", proj=c.empty(288, HID))
    t.bad("scale on the host", cuda_msg("scale"), scale=c.host(t.base["scale"]))
    t.bad("scale dtype", "scale has dtype float32, expected bfloat16", scale=c.empty(HID, dtype=F32))
    t.bad("scale 2-d", f"scale has shape [1, {HID}], expected 1 dimensions", scale=c.empty(1, HID))
    t.bad("scale length", f"scale has shape [256], expected size {HID} in dimension 0 (hidden)", scale=c.empty(256))
    t.bad("scale strided", f"scale must be contiguous (shape [{HID}])", scale=c.strided_vector(HID))
    t.bad("expert_scale on the host", cuda_msg("expert_scale"), expert_scale=c.host(t.base["expert_scale"]))
    t.bad("expert_scale length", f"expert_scale has shape [16], expected size {EXP} in dimension 0 (experts)",
          expert_scale=c.empty(16))
    t.bad("top_k 0", "top_k is 0, expected 1..16", top_k=0)
    t.bad("top_k 17", "top_k is 17, expected 1..16", top_k=17)
    t.bad("top_k negative", "top_k is -3, expected 1..16", top_k=-3)
    t.bad("eps zero", "eps must be positive, got 0.000000", eps=0.0)
    t.bad("eps negative", "eps must be positive, got -1.000000", eps=-1.0)
    t.bad("weights on the host", f"weights is on cuda:-1, {dev}", weights=c.host(t.base["weights"]))
    t.bad("weights dtype", "weights has dtype bfloat16, expected float32", weights=c.empty(N_TOK, TOPK))
    t.bad("weights top_k", f"weights has shape [{N_TOK}, 4], expected size {TOPK} in dimension 1 (top_k)",
          weights=c.empty(N_TOK, 4, dtype=F32))
    t.bad("weights tokens", f"weights has shape [3, {TOPK}], expected size {N_TOK} in dimension 0 (tokens)",
          weights=c.empty(3, TOPK, dtype=F32))
    t.bad("ids on the host", f"ids is on cuda:-1, {dev}", ids=c.host(t.base["ids"]))
    t.bad("ids int64", "ids has dtype int64, expected int32", ids=c.empty(N_TOK, TOPK, dtype=I64))
    t.bad("ids transposed", f"ids must be contiguous (shape [{N_TOK}, {TOPK}])",
          ids=c.transposed(N_TOK, TOPK, dtype=I32))
    big = 12744  # 8 * 12744 * 2 + 8 * 32 * 4 bytes of shared memory > 200 KiB
    t.bad("hidden too large for the router", f"x hidden size {big} is too large for the router",
          x=c.empty(1, big), proj=c.empty(EXP, big), scale=c.empty(big), weights=c.empty(1, TOPK, dtype=F32),
          ids=c.empty(1, TOPK, dtype=I32))
    t.bad("x is None", not_tensor("x"), x=None)
    t.bad("ids is None", not_tensor("ids"), ids=None)
    t.type_error("top_k beyond int", "top_k=1099511627776", top_k=2**40)
    t.type_error("top_k is a float", "top_k=8.0", top_k=8.0)
    t.type_error("eps is None", "eps=None", eps=None)

    def check(_):
        w, ids = t.base["weights"], t.base["ids"].long()
        assert torch.isfinite(w).all() and bool((w > 0).all())
        assert bool(((ids >= 0) & (ids < EXP)).all())
        assert bool((ids.sort(1).values.diff(dim=1) > 0).all()), "an expert chosen twice for one token"

    t.check = check
    return t


def moe_plan_table(c: Ctx) -> Table:
    from dgemma.ops.cuda_moe import plan_dispatch

    ids, _ = _routing(c)
    t = Table("moe_plan", dict(ids=ids, experts=EXP, offsets=c.empty(EXP + 1, dtype=I32),
                               row_of=c.empty(N_TOK, TOPK, dtype=I32), row_expert=c.empty(N_TOK * TOPK, dtype=I32),
                               stream=0, pad=1, row_src=None, tile_expert=None, num_tiles=None, scratch=None))
    t.bad("ids on the host", cuda_msg("ids"), ids=c.host(ids))
    t.bad("ids int64", "ids has dtype int64, expected int32", ids=c.empty(N_TOK, TOPK, dtype=I64))
    t.bad("ids 1-d", f"ids has shape [{N_TOK * TOPK}], expected 2 dimensions", ids=c.empty(N_TOK * TOPK, dtype=I32))
    t.bad("ids transposed", f"ids must be contiguous (shape [{N_TOK}, {TOPK}])",
          ids=c.transposed(N_TOK, TOPK, dtype=I32))
    # torch gives [N, 0] the strides (1, 1), which the launcher's is_contiguous rejects before top_k is
    # looked at; strides (0, 1) are "contiguous" for it and reach the top_k check.
    t.bad("top_k 0", f"ids has shape [{N_TOK}, 0]: top_k must be in [1, 16]",
          ids=torch.empty_strided((N_TOK, 0), (0, 1), dtype=I32, device=c.dev))
    t.bad("top_k 17", f"ids has shape [{N_TOK}, 17]: top_k must be in [1, 16]", ids=c.empty(N_TOK, 17, dtype=I32))
    t.bad("no experts", "experts is 0, expected 1..256", experts=0)
    t.bad("257 experts", "experts is 257, expected 1..256", experts=257)
    t.bad("offsets on the host", cuda_msg("offsets"), offsets=c.host(t.base["offsets"]))
    t.bad("offsets dtype", "offsets has dtype int64, expected int32", offsets=c.empty(EXP + 1, dtype=I64))
    t.bad("offsets length", f"offsets has shape [{EXP}], expected size {EXP + 1} in dimension 0 (experts + 1)",
          offsets=c.empty(EXP, dtype=I32))
    t.bad("offsets strided", f"offsets must be contiguous (shape [{EXP + 1}])",
          offsets=c.strided_vector(EXP + 1, dtype=I32))
    t.bad("row_of on the host", f"row_of is on cuda:-1, expected cuda:{c.idx} (the device of ids)",
          row_of=c.host(t.base["row_of"]))
    t.bad("row_of dtype", "row_of has dtype float32, expected int32", row_of=c.empty(N_TOK, TOPK, dtype=F32))
    t.bad("row_of shape", f"row_of has shape [{N_TOK}, 4], expected size {TOPK} in dimension 1 (top_k)",
          row_of=c.empty(N_TOK, 4, dtype=I32))
    t.bad("row_expert on the host", cuda_msg("row_expert"), row_expert=c.host(t.base["row_expert"]))
    t.bad("row_expert length",
          f"row_expert has shape [{N_TOK * TOPK - 1}], expected size {N_TOK * TOPK} in dimension 0 "
          "(tokens * top_k)", row_expert=c.empty(N_TOK * TOPK - 1, dtype=I32))
    t.bad("row_expert 2-d", f"row_expert has shape [{N_TOK}, {TOPK}], expected 1 dimensions",
          row_expert=c.empty(N_TOK, TOPK, dtype=I32))
    t.bad("offsets is None", not_tensor("offsets"), offsets=None)
    t.type_error("experts is None", "experts=None", experts=None)
    # The padded plan (pad > 1): its row arrays hold the worst padding, tokens * top_k + experts * (pad - 1) rows.
    padded = N_TOK * TOPK + EXP * 31
    t.bad("pad 0", "pad is 0, expected 1..1024", pad=0)
    t.bad("pad 2048", "pad is 2048, expected 1..1024", pad=2048)
    t.bad("padded outputs without pad", "row_src, tile_expert and num_tiles are outputs of a padded plan (pad > 1)",
          row_src=c.empty(N_TOK * TOPK, dtype=I32))
    t.bad("padded row_expert too short", f"row_expert has shape [{N_TOK * TOPK}], expected size {padded} in dimension "
          "0 (tokens * top_k + experts * (pad - 1))", pad=32)
    t.bad("pad without its outputs", "a padded plan (pad > 1) writes row_src, tile_expert and num_tiles: pass all "
          "three", pad=32, row_expert=c.empty(padded, dtype=I32))
    t.bad("tile_expert length", f"tile_expert has shape [3], expected size {(padded + 31) // 32} in dimension 0 "
          "(ceil(padded rows / pad))", pad=32, row_expert=c.empty(padded, dtype=I32),
          row_src=c.empty(padded, dtype=I32), tile_expert=c.empty(3, dtype=I32), num_tiles=c.empty(1, dtype=I32))
    t.bad("num_tiles dtype", "num_tiles has dtype int64, expected int32", pad=32, row_expert=c.empty(padded, dtype=I32),
          row_src=c.empty(padded, dtype=I32), tile_expert=c.empty((padded + 31) // 32, dtype=I32),
          num_tiles=c.empty(1, dtype=I64))
    t.type_error("pad is a float", "pad=32.5", pad=32.5)
    t.bad("scratch too small", f"scratch has 3 entries, expected at least {EXP} (experts * ceil(tokens * top_k / 1024))",
          scratch=c.empty(3, dtype=I32))
    t.bad("scratch dtype", "scratch has dtype int64, expected int32", scratch=c.empty(EXP, dtype=I64))

    def check(_):
        o_ref, r_ref, e_ref = plan_dispatch(ids, EXP)
        assert torch.equal(t.base["offsets"], o_ref) and torch.equal(t.base["row_of"], r_ref)
        assert torch.equal(t.base["row_expert"][: N_TOK * TOPK], e_ref)

    t.check = check
    return t


def moe_fp8_workspace_layout_table(c: Ctx) -> Table:
    t = Table("moe_fp8_workspace_layout", dict(tokens=N_TOK, slots=TOPK + 3, hidden=HID, inter=MOE_I, experts=EXP,
                                               device=c.idx))
    msg = "moe_fp8_workspace_layout: sizes must be positive (tokens may be 0)"
    t.bad("negative tokens", msg, tokens=-1)
    t.bad("no slots", msg, slots=0)
    t.bad("no hidden", msg, hidden=0)
    t.bad("no experts", msg, experts=0)
    t.type_error("slots is a string", "slots='8'", slots="8")

    def check(layout):
        down_at, rows, row_of_at = layout
        nbytes = int(c.lib.moe_fp8_workspace_bytes(N_TOK, TOPK + 3, HID, MOE_I, EXP, c.idx, True))
        assert rows >= N_TOK * (TOPK + 3) and down_at % 256 == 0 and row_of_at % 256 == 0
        assert down_at + rows * HID * 2 <= nbytes and row_of_at + N_TOK * (TOPK + 3) * 4 <= nbytes

    t.check = check
    return t


def ffn_residual_experts_table(c: Ctx) -> Table:
    from dgemma.ops.reference import ReferenceOps

    n, d, slots, top_k, rows = 6, 512, 5, 3, 40
    x, down = c.randn(n, d), c.randn(rows, d)
    g = torch.Generator(device=c.dev).manual_seed(3)
    row_of = torch.randperm(rows, generator=g, device=c.dev)[:n * slots].view(n, slots).int().contiguous()
    row_of[0, 1] = -1  # a slot without a row adds nothing
    w = [(torch.rand(d, generator=c.gen, device=c.dev) + 0.5).to(BF16) for _ in range(3)]
    scalar = torch.full((1,), 0.75, dtype=BF16, device=c.dev)
    t = Table("ffn_residual_experts", dict(x=x, down=down, row_of=row_of, top_k=top_k, w_mlp=w[0], w_moe=w[1],
                                           w_ff=w[2], scalar=scalar, out=c.empty(n, d), eps=1e-6, stream=0,
                                           q_weight=None, q=None, q_scale=None))
    # Order of the checks in csrc/ops/rms_norm.cu (ffn_residual_experts, then the shared residual checks).
    t.bad("x on the host", cuda_msg("x"), x=c.host(x))
    t.bad("x float16", "x has dtype float16, expected float32 or bfloat16", x=c.empty(n, d, dtype=torch.float16))
    t.bad("out shape", f"out has shape [3, {d}], expected [{n}, {d}] (as x)", out=c.empty(3, d))
    t.bad("eps zero", "eps must be positive, got 0.000000", eps=0.0)
    t.bad("x float32", "x has dtype float32, expected bfloat16 (the expert rows' dtype)", x=c.empty(n, d, dtype=F32),
          out=c.empty(n, d, dtype=F32))
    t.bad("hidden too large", "x last dimension is 3080, expected a multiple of 8 up to 3072", x=c.empty(n, 3080),
          out=c.empty(n, 3080))
    t.bad("hidden not a multiple of 8", "x last dimension is 20, expected a multiple of 8 up to 3072",
          x=c.empty(n, 20), out=c.empty(n, 20))
    t.bad("down on the host", cuda_msg("down"), down=c.host(down))
    t.bad("down dtype", "down has dtype float32, expected bfloat16", down=c.empty(rows, d, dtype=F32))
    t.bad("down width", f"down has shape [{rows}, 256], expected size {d} in dimension 1 (the normalised dimension)",
          down=c.empty(rows, 256))
    t.bad("down misaligned", "down must be 16-byte aligned", down=c.misaligned(rows, d))
    t.bad("row_of dtype", "row_of has dtype int64, expected int32", row_of=c.empty(n, slots, dtype=I64))
    t.bad("row_of rows", f"row_of has shape [4, {slots}], expected size {n} in dimension 0 (rows of x)",
          row_of=c.empty(4, slots, dtype=I32))
    t.bad("top_k 0", f"top_k is 0, expected 1..{slots - 1}", top_k=0)
    t.bad("top_k every slot", f"top_k is {slots}, expected 1..{slots - 1}", top_k=slots)
    t.bad("w_moe length", "w_moe has shape [256], expected size 512 in dimension 0 (the normalised dimension)",
          w_moe=c.empty(256))
    t.bad("scalar two elements", "scalar has shape [2], expected one element", scalar=c.empty(2))
    t.bad("q without q_scale", "q and q_scale must be given together (q_weight with them, or neither)",
          q=c.empty(n, d, dtype=FP8))
    t.bad("down is None", not_tensor("down"), down=None)
    t.type_error("top_k is a string", "top_k='3'", top_k="3")

    def check(_):
        out = t.base["out"]
        ro = row_of.long()
        gathered = down[ro.clamp(min=0)].float() * (ro >= 0).unsqueeze(-1)
        moe, mlp = torch.zeros(n, d, device=c.dev), torch.zeros(n, d, device=c.dev)
        for k in range(slots):
            if k < top_k:
                moe = moe + gathered[:, k]
            else:
                mlp = mlp + gathered[:, k]
        ref = ReferenceOps().ffn_residual(x, mlp.bfloat16(), moe.bfloat16(), w[0], w[1], w[2], scalar, 1e-6)
        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)

    t.check = check
    return t


def embed_norm_table(c: Ctx) -> Table:
    from dgemma.ops.reference import ReferenceOps

    vocab, d = 50, 512
    table = c.randn(vocab, d, scale=0.1)
    ids = torch.randint(0, vocab, (2, 3), generator=c.gen, device=c.dev)
    add = c.randn(2, 3, d)
    t = Table("embed_norm", dict(ids=ids, table=table, scale=8.0, add=add, out=c.empty(2, 3, d), eps=1e-6, stream=0,
                                 q_weight=None, q=None, q_scale=None))
    # Order of the checks in csrc/ops/rms_norm.cu (embed_norm).
    t.bad("table on the host", cuda_msg("table"), table=c.host(table))
    t.bad("table float32", "table has dtype float32, expected bfloat16", table=c.empty(vocab, d, dtype=F32))
    t.bad("table 3-d", f"table has shape [1, {vocab}, {d}], expected 2 dimensions", table=c.empty(1, vocab, d))
    t.bad("ids on the host", cuda_msg("ids"), ids=c.host(ids))
    t.bad("ids int32", "ids has dtype int32, expected int64", ids=c.empty(2, 3, dtype=I32))
    t.bad("out shape", f"out has shape [2, 4, {d}], expected [2, 3, {d}] (ids' shape and the table's row length)",
          out=c.empty(2, 4, d))
    t.bad("out dtype", "out has dtype float32, expected bfloat16", out=c.empty(2, 3, d, dtype=F32))
    t.bad("add shape", f"add has shape [2, 3, 256], expected [2, 3, {d}] (as out)", add=c.empty(2, 3, 256))
    t.bad("eps zero", "eps must be positive, got 0.000000", eps=0.0)
    t.bad("scale nan", "scale must be finite, got nan", scale=float("nan"))
    t.bad("q without q_scale", "q and q_scale must be given together (q_weight with them, or neither)",
          q=c.empty(6, d, dtype=FP8))
    t.bad("q rows", f"q has shape [5, {d}], expected size 6 in dimension 0 (rows of x)",
          q=c.empty(5, d, dtype=FP8), q_scale=c.empty(6, dtype=F32))
    t.bad("out is add", "out must not overlap add (the kernel reads it after writing out)", out=add)
    t.bad("table is None", not_tensor("table"), table=None)
    t.type_error("scale is a string", "scale='8'", scale="8")

    def check(_):
        x = ReferenceOps().embed(ids, table, 8.0) + add
        ref = ReferenceOps().rms_norm(x, None, 1e-6)
        torch.testing.assert_close(t.base["out"].float(), ref.float(), rtol=2e-2, atol=2e-2)

    t.check = check
    return t


def moe_fp8_workspace_bytes_table(c: Ctx) -> Table:
    t = Table("moe_fp8_workspace_bytes", dict(tokens=N_TOK, top_k=TOPK, hidden=HID, inter=MOE_I, experts=EXP,
                                              device=c.idx, contiguous=True))
    msg = "moe_fp8_workspace_bytes: sizes must be positive (tokens may be 0)"
    t.bad("negative tokens", msg, tokens=-1)
    t.bad("top_k 0", msg, top_k=0)
    t.bad("no hidden", msg, hidden=0)
    t.bad("no intermediate", msg, inter=0)
    t.bad("no experts", msg, experts=0)
    t.type_error("experts is a string", "experts='32'", experts="32")

    t.check = _positive_size
    return t


def moe_fp8_table(c: Ctx) -> Table:
    from dgemma.ops.reference import ReferenceOps
    from dgemma.quant import quantize_weight

    gate_up = quantize_weight(c.randn(EXP, 2 * MOE_I, HID, scale=HID ** -0.5))
    down = quantize_weight(c.randn(EXP, HID, MOE_I, scale=MOE_I ** -0.5))
    x = c.randn(N_TOK, HID)
    ids, weights = _routing(c)
    nbytes = c.workspace_bytes("moe_fp8_workspace_bytes", N_TOK, TOPK, HID, MOE_I, EXP)
    t = Table("moe_fp8", dict(x=x, ids=ids, weights=weights, gate_up_q=gate_up.q, gate_up_scale=gate_up.scale,
                              down_q=down.q, down_scale=down.scale, out=c.empty(N_TOK, HID),
                              workspace=c.empty(nbytes, dtype=U8), stream=0, contiguous=True, norm=None, eps=1e-6,
                              shared=0, shared_norm=None, shared_out=None, combine=True))
    dev = f"expected cuda:{c.idx} (the device of x)"
    gu, dq = "gate_up.q", "down.q"
    # x: check_matrix(bf16, any shape, contiguous)
    t.bad("x on the host", cuda_msg("x"), x=c.host(x))
    t.bad("x float32", "x has dtype float32, expected bfloat16", x=c.empty(N_TOK, HID, dtype=F32))
    t.bad("x 3-d", f"x has shape [1, {N_TOK}, {HID}], expected 2 dimensions", x=c.empty(1, N_TOK, HID))
    t.bad("x row slice", f"x must be contiguous (shape [{N_TOK}, {HID}])", x=c.padded_rows(N_TOK, HID, 16))
    # ids: check_ids + tokens
    # norm (the fused pre-MoE norm): a bf16 [hidden] vector on x's device, and a positive eps
    t.bad("norm dtype", "norm has dtype float32, expected bfloat16", norm=c.empty(HID, dtype=F32))
    t.bad("norm length", f"norm has shape [256], expected size {HID} in dimension 0 (hidden)", norm=c.empty(256))
    t.bad("norm on the host", cuda_msg("norm"), norm=c.host(c.empty(HID)))
    t.bad("norm eps zero", "eps must be positive, got 0.000000", norm=c.empty(HID), eps=0.0)
    t.bad("ids on the host", cuda_msg("ids"), ids=c.host(ids))
    t.bad("ids int64", "ids has dtype int64, expected int32", ids=c.empty(N_TOK, TOPK, dtype=I64))
    t.bad("ids 3-d", f"ids has shape [1, {N_TOK}, {TOPK}], expected 2 dimensions",
          ids=c.empty(1, N_TOK, TOPK, dtype=I32))
    t.bad("ids transposed", f"ids must be contiguous (shape [{N_TOK}, {TOPK}])",
          ids=c.transposed(N_TOK, TOPK, dtype=I32))
    t.bad("ids top_k 17", f"ids has shape [{N_TOK}, 17]: top_k must be in [1, 16]", ids=c.empty(N_TOK, 17, dtype=I32))
    t.bad("ids tokens", f"ids has shape [3, {TOPK}], expected size {N_TOK} in dimension 0 (tokens (rows of x))",
          ids=c.empty(3, TOPK, dtype=I32))
    # weights
    t.bad("weights on the host", f"weights is on cuda:-1, {dev}", weights=c.host(weights))
    t.bad("weights dtype", "weights has dtype bfloat16, expected float32", weights=c.empty(N_TOK, TOPK))
    t.bad("weights top_k", f"weights has shape [{N_TOK}, 4], expected size {TOPK} in dimension 1 (top_k)",
          weights=c.empty(N_TOK, 4, dtype=F32))
    t.bad("weights transposed", f"weights must be contiguous (shape [{N_TOK}, {TOPK}])",
          weights=c.transposed(N_TOK, TOPK, dtype=F32))
    # gate_up.q
    t.bad("gate_up.q on the host", cuda_msg(gu), gate_up_q=c.host(gate_up.q))
    t.bad("gate_up.q dtype", f"{gu} has dtype bfloat16, expected float8_e4m3fn", gate_up_q=c.empty(EXP, 2 * MOE_I, HID))
    t.bad("gate_up.q 2-d", f"{gu} has shape [{EXP * 2 * MOE_I}, {HID}], expected 3 dimensions",
          gate_up_q=c.empty(EXP * 2 * MOE_I, HID, dtype=FP8))
    t.bad("gate_up.q strided", f"{gu} must be contiguous (shape [{EXP}, {2 * MOE_I}, {HID}])",
          gate_up_q=torch.empty(EXP, 2 * MOE_I, 2 * HID, dtype=FP8, device=c.dev)[:, :, :HID])
    t.bad("no experts", f"{gu} has 0 experts, expected 1..256", gate_up_q=c.empty(0, 2 * MOE_I, HID, dtype=FP8))
    t.bad("257 experts", f"{gu} has 257 experts, expected 1..256", gate_up_q=c.empty(257, 1, 1, dtype=FP8))
    t.bad("gate_up.q hidden", f"{gu} has shape [{EXP}, {2 * MOE_I}, 256], expected size {HID} in dimension 2 "
          "(hidden (columns of x))", gate_up_q=c.empty(EXP, 2 * MOE_I, 256, dtype=FP8))
    t.bad("2 * intermediate not a multiple of 32", f"{gu} dimension 1 (2 * intermediate) is 48, expected a positive "
          "multiple of 32", gate_up_q=c.empty(EXP, 48, HID, dtype=FP8))
    t.bad("hidden not a multiple of 16", "x last dimension (hidden) is 8, expected a positive multiple of 16",
          x=c.empty(N_TOK, 8), gate_up_q=c.empty(1, 32, 8, dtype=FP8))
    t.bad("hidden too large", "x hidden size 4112 exceeds 4096", x=c.empty(N_TOK, 4112),
          gate_up_q=c.empty(1, 32, 4112, dtype=FP8))
    t.bad("intermediate too large", f"{gu} intermediate size 4112 exceeds 4096",
          gate_up_q=c.empty(1, 8224, HID, dtype=FP8))
    # gate_up.scale
    t.bad("gate_up.scale on the host", f"gate_up.scale is on cuda:-1, {dev}", gate_up_scale=c.host(gate_up.scale))
    t.bad("gate_up.scale dtype", "gate_up.scale has dtype bfloat16, expected float32",
          gate_up_scale=c.empty(EXP, 2 * MOE_I))
    t.bad("gate_up.scale shape", f"gate_up.scale has shape [{EXP}, {MOE_I}], expected size {2 * MOE_I} in dimension 1 "
          "(2 * intermediate)", gate_up_scale=c.empty(EXP, MOE_I, dtype=F32))
    # down.q
    t.bad("down.q on the host", cuda_msg(dq), down_q=c.host(down.q))
    t.bad("down.q dtype", f"{dq} has dtype bfloat16, expected float8_e4m3fn", down_q=c.empty(EXP, HID, MOE_I))
    t.bad("down.q experts", f"{dq} has shape [16, {HID}, {MOE_I}], expected size {EXP} in dimension 0 (experts)",
          down_q=c.empty(16, HID, MOE_I, dtype=FP8))
    t.bad("down.q hidden", f"{dq} has shape [{EXP}, 256, {MOE_I}], expected size {HID} in dimension 1 (hidden)",
          down_q=c.empty(EXP, 256, MOE_I, dtype=FP8))
    t.bad("down.q intermediate", f"{dq} has shape [{EXP}, {HID}, 64], expected size {MOE_I} in dimension 2 "
          "(intermediate)", down_q=c.empty(EXP, HID, 64, dtype=FP8))
    # down.scale, out
    t.bad("down.scale on the host", f"down.scale is on cuda:-1, {dev}", down_scale=c.host(down.scale))
    t.bad("down.scale shape", f"down.scale has shape [{EXP}, 256], expected size {HID} in dimension 1 (hidden)",
          down_scale=c.empty(EXP, 256, dtype=F32))
    t.bad("out on the host", f"out is on cuda:-1, {dev}", out=c.host(t.base["out"]))
    t.bad("out dtype", "out has dtype float32, expected bfloat16", out=c.empty(N_TOK, HID, dtype=F32))
    t.bad("out tokens", f"out has shape [4, {HID}], expected size {N_TOK} in dimension 0 (tokens)", out=c.empty(4, HID))
    # 16-byte alignment, checked after every shape
    t.bad("x misaligned", "x must be 16-byte aligned", x=c.misaligned(N_TOK, HID))
    t.bad("out misaligned", "out must be 16-byte aligned", out=c.misaligned(N_TOK, HID))
    t.bad("gate_up.q misaligned", f"{gu} must be 16-byte aligned",
          gate_up_q=c.misaligned(EXP, 2 * MOE_I, HID, dtype=FP8))
    t.bad("down.scale misaligned", "down.scale must be 16-byte aligned", down_scale=c.misaligned(EXP, HID, dtype=F32))
    _workspace_errors(t, c, nbytes)
    t.bad("gate_up.q is None", not_tensor(gu), gate_up_q=None)
    ptr_bytes = int(c.lib.moe_fp8_workspace_bytes(N_TOK, TOPK, HID, MOE_I, EXP, c.idx, False))
    if ptr_bytes != nbytes:  # each pipeline asks for its own workspace
        t.bad("workspace of the other pipeline", f"workspace has {min(ptr_bytes, nbytes)} bytes, expected at least "
              f"{max(ptr_bytes, nbytes)}", workspace=c.empty(min(ptr_bytes, nbytes), dtype=U8),
              contiguous=nbytes > ptr_bytes)  # the pipeline that needs more, given the other's workspace
    t.type_error("contiguous is a string", "contiguous='yes'", contiguous="yes")
    # shared experts (the dense MLP in expert-sized pieces): the last `shared` of the stacks
    sh_out = c.empty(N_TOK, HID)
    shared_msg = f"expected 0..{EXP - 1} (shared experts are the last of the {EXP} in {gu}; at least one must be routed)"
    t.bad("shared negative", f"shared is -1, {shared_msg}", shared=-1)
    t.bad("shared every expert", f"shared is {EXP}, {shared_msg}", shared=EXP, shared_out=sh_out)
    t.bad("shared 17", "shared is 17, expected at most 16", shared=17, shared_out=sh_out)
    t.bad("shared on the pointer-array pipeline", "shared experts (shared = 2) run on the contiguous pipeline only",
          shared=2, shared_out=sh_out, contiguous=False)
    t.bad("shared without shared_out", "shared experts need shared_out (their sum per token)", shared=2)
    t.bad("shared_out without shared", "shared_out is given but shared is 0", shared_out=sh_out)
    t.bad("shared_norm without norm", "shared_norm is given without norm and shared experts (shared > 0)",
          shared=2, shared_out=sh_out, shared_norm=c.empty(HID))
    t.bad("norm without shared_norm", "norm is given with shared experts: pass shared_norm",
          shared=2, shared_out=sh_out, norm=c.empty(HID))
    t.bad("shared_norm dtype", "shared_norm has dtype float32, expected bfloat16", shared=2, shared_out=sh_out,
          norm=c.empty(HID), shared_norm=c.empty(HID, dtype=F32))
    t.bad("shared_norm length", f"shared_norm has shape [256], expected size {HID} in dimension 0 (hidden)", shared=2,
          shared_out=sh_out, norm=c.empty(HID), shared_norm=c.empty(256))
    t.bad("shared_out on the host", f"shared_out is on cuda:-1, {dev}", shared=2, shared_out=c.host(sh_out))
    t.bad("shared_out tokens", f"shared_out has shape [4, {HID}], expected size {N_TOK} in dimension 0 (tokens)",
          shared=2, shared_out=c.empty(4, HID))
    t.bad("shared_out misaligned", "shared_out must be 16-byte aligned", shared=2,
          shared_out=c.misaligned(N_TOK, HID))
    t.bad("shared_out is out", "shared_out must not overlap out (the combine writes both)", shared=2,
          shared_out=t.base["out"])
    t.bad("out missing", "out is required (the combined rows) unless combine = false", out=None)
    t.bad("combine off with out", "out and shared_out are the combine's: with combine = false pass neither",
          combine=False)
    t.bad("combine off on the pointer-array pipeline", "combine = false needs the contiguous pipeline",
          combine=False, out=None, contiguous=False)
    t.type_error("combine is a string", "combine='no'", combine="no")
    shared_bytes = int(c.lib.moe_fp8_workspace_bytes(N_TOK, TOPK + 2, HID, MOE_I, EXP, c.idx, True))
    t.bad("workspace without the shared rows", f"workspace has {nbytes} bytes, expected at least {shared_bytes}",
          shared=2, shared_out=sh_out)
    t.type_error("shared is a string", "shared='2'", shared="2")

    def check(_):
        out = t.base["out"]
        assert torch.isfinite(out.float()).all()
        ref = ReferenceOps().moe(x.float(), ids.long(), weights, gate_up, down)
        # two per-token E4M3 quantisations in a row (x, then each expert's gelu·up): ~4.6 % against fp32
        assert rel_err(out, ref) <= 6e-2

    t.check = check
    return t


# -- attention -------------------------------------------------------------------------------------

B, T, HQ, HKV, D, SLOTS, PREFIX = 2, 8, 16, 8, 256, 64, 10


def qkv_prep_table(c: Ctx) -> Table:
    from dgemma.config import SLIDING, LayerSpec, RopeSpec
    from dgemma.ops.reference import ReferenceOps
    from dgemma.rope import cos_sin, inverse_frequencies

    spec = LayerSpec(0, SLIDING, D, HKV, RopeSpec("default", 1e4), 1024)
    cos, sin = cos_sin(inverse_frequencies(spec), torch.arange(T, device=c.dev)[None], BF16)
    slots = 32
    t = Table("qkv_prep", dict(
        q_in=c.randn(B, T, HQ * D, scale=3.0), k_in=c.randn(B, T, HKV * D, scale=3.0),
        v_in=c.randn(B, T, HKV * D, scale=3.0), q_weight=c.randn(D, scale=0.5), k_weight=c.randn(D, scale=0.5),
        cos=cos.contiguous(), sin=sin.contiguous(), q_out=c.empty(B, T, HQ, D), k_out=c.empty(B, T, HKV, D),
        v_out=c.empty(B, T, HKV, D), cache_k=c.randn(B, HKV, slots, D), cache_v=c.randn(B, HKV, slots, D),
        cache_start=0, ring_size=0, eps=1e-6, stream=0))
    base = t.base
    # q_out first: it fixes batch, tokens, q heads and head_dim.
    t.bad("q_out on the host", cuda_msg("q_out"), q_out=c.host(base["q_out"]))
    t.bad("q_out float32", "q_out has dtype float32, expected bfloat16", q_out=c.empty(B, T, HQ, D, dtype=F32))
    t.bad("q_out 3-d", f"q_out has shape [{B}, {T}, {HQ * D}], expected 4 dimensions", q_out=c.empty(B, T, HQ * D))
    t.bad("q_out last dimension strided", "q_out must be contiguous in its last dimension",
          q_out=c.empty(B, T, D, HQ).transpose(2, 3))
    t.bad("q_out odd stride", "q_out stride 260 of dimension 2 must be a multiple of 8 elements (16 bytes)",
          q_out=c.empty(B, T, HQ, 260)[..., :D])
    t.bad("q_out misaligned", "q_out data must be 16-byte aligned", q_out=c.misaligned(B, T, HQ, D))
    t.bad("q_out padded", f"q_out must be contiguous (shape [{B}, {T}, {HQ}, {D}])",
          q_out=c.empty(B, T, HQ, 264)[..., :D])
    t.bad("head_dim 128", "q_out head_dim 128 is not supported (expected 256 or 512)", q_out=c.empty(B, T, HQ, 128))
    t.bad("k_out on the host", cuda_msg("k_out"), k_out=c.host(base["k_out"]))
    t.bad("k_out tokens", f"k_out has shape [{B}, 4, {HKV}, {D}], expected [{B}, {T}, {HKV}, {D}]",
          k_out=c.empty(B, 4, HKV, D))
    t.bad("k_out padded", f"k_out must be contiguous (shape [{B}, {T}, {HKV}, {D}])",
          k_out=c.empty(B, T, HKV, 264)[..., :D])
    t.bad("v_out heads differ from k_out", f"v_out has shape [{B}, {T}, 4, {D}], expected [{B}, {T}, {HKV}, {D}]",
          v_out=c.empty(B, T, 4, D))
    t.bad("v_out dtype", "v_out has dtype float32, expected bfloat16", v_out=c.empty(B, T, HKV, D, dtype=F32))
    t.bad("q_in on the host", cuda_msg("q_in"), q_in=c.host(base["q_in"]))
    t.bad("q_in 2-d", f"q_in has shape [{B * T}, {HQ * D}], expected 3 dimensions", q_in=c.empty(B * T, HQ * D))
    t.bad("q_in width", f"q_in has shape [{B}, {T}, {HKV * D}], expected [{B}, {T}, {HQ * D}]",
          q_in=c.empty(B, T, HKV * D))
    t.bad("q_in last dimension strided", "q_in must be contiguous in its last dimension",
          q_in=c.empty(B, T, 2 * HQ * D)[..., ::2])
    t.bad("k_in on the host", cuda_msg("k_in"), k_in=c.host(base["k_in"]))
    t.bad("k_in width", f"k_in has shape [{B}, {T}, {HQ * D}], expected [{B}, {T}, {HKV * D}]",
          k_in=c.empty(B, T, HQ * D))
    t.bad("k_in misaligned", "k_in data must be 16-byte aligned", k_in=c.misaligned(B, T, HKV * D))
    t.bad("v_in on the host", cuda_msg("v_in"), v_in=c.host(base["v_in"]))
    t.bad("v_in width", f"v_in has shape [{B}, {T}, 1024], expected [{B}, {T}, {HKV * D}]", v_in=c.empty(B, T, 1024))
    t.bad("q_weight length", f"q_weight has shape [128], expected [{D}]", q_weight=c.empty(128))
    t.bad("q_weight strided", "q_weight must be contiguous in its last dimension", q_weight=c.strided_vector(D))
    t.bad("k_weight dtype", "k_weight has dtype float32, expected bfloat16", k_weight=c.empty(D, dtype=F32))
    t.bad("k_weight on the host", cuda_msg("k_weight"), k_weight=c.host(base["k_weight"]))
    t.bad("cos tokens", f"cos has shape [1, 4, {D}], expected [1, {T}, {D}]",
          cos=c.empty(1, 4, D), sin=c.empty(1, 4, D))
    t.bad("sin batch", f"sin has shape [3, {T}, {D}], expected [{B}, {T}, {D}]", sin=c.empty(3, T, D))
    t.bad("sin on the host", cuda_msg("sin"), sin=c.host(base["sin"]))
    t.bad("cos and sin strides differ", "cos and sin must have the same shape and strides",
          sin=torch.empty(1, T, D + 8, dtype=BF16, device=c.dev)[..., :D])
    t.bad("cos and sin shapes differ", "cos and sin must have the same shape and strides", cos=c.empty(B, T, D))
    t.bad("eps zero", "eps must be positive, got 0.000000", eps=0.0)
    t.bad("eps negative", "eps must be positive, got -0.500000", eps=-0.5)
    t.bad("cache_k without cache_v", "cache_k and cache_v must be given together", cache_v=None)
    t.bad("cache_v without cache_k", "cache_k and cache_v must be given together", cache_k=None)
    t.bad("cache_k on the host", cuda_msg("cache_k"), cache_k=c.host(base["cache_k"]))
    t.bad("cache_v dtype", "cache_v has dtype float32, expected bfloat16", cache_v=c.empty(B, HKV, slots, D, dtype=F32))
    t.bad("cache_k heads", f"cache_k has shape [{B}, 4, {slots}, {D}], expected [{B}, {HKV}, {slots}, {D}]",
          cache_k=c.empty(B, 4, slots, D))
    t.bad("cache_v slots", f"cache_v has shape [{B}, {HKV}, 16, {D}], expected [{B}, {HKV}, {slots}, {D}]",
          cache_v=c.empty(B, HKV, 16, D))
    t.bad("ring larger than the cache", f"ring_size = {slots + 1} must be in [0, {slots}]", ring_size=slots + 1)
    t.bad("negative ring", f"ring_size = -1 must be in [0, {slots}]", ring_size=-1)
    t.bad("negative cache_start", f"cache_start = -1 must be in [0, {2**31 - 1 - T}]", cache_start=-1)
    t.bad("positions past the cache", f"positions 30..37 exceed the cache's {slots} slots", cache_start=30)
    t.bad("q_in is None", not_tensor("q_in"), q_in=None)
    t.bad("k_weight is None", not_tensor("k_weight"), k_weight=None)
    t.type_error("cache_start is a string", "cache_start='0'", cache_start="0")
    t.type_error("eps is None", "eps=None", eps=None)

    def check(_):
        ops = ReferenceOps()
        rq = ops.rope(ops.rms_norm(base["q_in"].reshape(B, T, HQ, D), base["q_weight"], 1e-6), cos, sin)
        rk = ops.rope(ops.rms_norm(base["k_in"].reshape(B, T, HKV, D), base["k_weight"], 1e-6), cos, sin)
        rv = ops.rms_norm(base["v_in"].reshape(B, T, HKV, D), None, 1e-6)
        for got, ref in ((base["q_out"], rq), (base["k_out"], rk), (base["v_out"], rv)):
            assert torch.isfinite(got.float()).all()
            assert rel_err(got, ref) <= 1e-2
        assert torch.equal(base["cache_k"][:, :, :T], base["k_out"].transpose(1, 2))
        assert torch.equal(base["cache_v"][:, :, :T], base["v_out"].transpose(1, 2))

    t.check = check
    return t


def attention_tile_shape_table(c: Ctx) -> Table:
    t = Table("attention_tile_shape", dict(head_dim=256, impl=0))
    for d in (128, 0, -256, 384, 2**40):
        t.bad(f"head_dim {d}", f"attention head_dim {d} is not supported (expected 256 or 512)", head_dim=d)
    t.bad("impl unknown", "attention impl -1 is not an implementation (expected 0 mma.sync, 1 wgmma or 2 "
          "wgmma_deep)", impl=-1)
    t.bad("wgmma head_dim 128", "attention head_dim 128 is not supported (expected 256 or 512)", head_dim=128, impl=1)
    t.type_error("head_dim is a string", "head_dim='256'", head_dim="256")

    def check(shape):
        assert tuple(shape) == (64, 64)

    t.check = check
    return t


def attention_forward_table(c: Ctx) -> Table:
    from dgemma.ops.reference import ReferenceOps

    cache_k = torch.full((B, HKV, SLOTS, D), float("nan"), dtype=BF16, device=c.dev)
    cache_v = torch.full_like(cache_k, float("nan"))
    cache_k[:, :, :PREFIX] = c.randn(B, HKV, PREFIX, D)
    cache_v[:, :, :PREFIX] = c.randn(B, HKV, PREFIX, D)
    t = Table("attention_forward", dict(
        q=c.randn(B, HQ, T, D, scale=1.5 / D ** 0.5), cache_k=cache_k, cache_v=cache_v,
        tail_k=c.randn(B, HKV, T, D), tail_v=c.randn(B, HKV, T, D),
        prefix_lens=torch.full((B,), PREFIX, dtype=I32, device=c.dev), valid=None,
        out=torch.full((B, T, HQ, D), float("nan"), dtype=BF16, device=c.dev), part_o=None, part_lse=None,
        split_counters=None, max_prefix=PREFIX, ring_size=0, window=0, causal=False, valid_tail=False, num_splits=1, split_tiles=1,
        stream=0, impl=0))
    base = t.base
    t.bad("q on the host", cuda_msg("q"), q=c.host(base["q"]))
    t.bad("q float32", "q has dtype float32, expected bfloat16", q=c.empty(B, HQ, T, D, dtype=F32))
    t.bad("q 3-d", f"q has shape [{HQ}, {T}, {D}], expected 4 dimensions", q=c.empty(HQ, T, D))
    t.bad("q last dimension strided", "q must be contiguous in its last dimension",
          q=c.empty(B, HQ, D, T).transpose(2, 3))
    t.bad("q odd stride", "q stride 260 of dimension 2 must be a multiple of 8 elements (16 bytes)",
          q=c.empty(B, HQ, T, 260)[..., :D])
    t.bad("q misaligned", "q data must be 16-byte aligned", q=c.misaligned(B, HQ, T, D))
    t.bad("head_dim 128", "q head_dim 128 is not supported (expected 256 or 512)", q=c.empty(B, HQ, T, 128))
    t.bad("cache_k on the host", cuda_msg("cache_k"), cache_k=c.host(cache_k))
    t.bad("cache_v dtype", "cache_v has dtype float32, expected bfloat16", cache_v=c.empty(B, HKV, SLOTS, D, dtype=F32))
    t.bad("cache_k batch", f"cache_k has shape [3, {HKV}, {SLOTS}, {D}], expected [{B}, {HKV}, {SLOTS}, {D}]",
          cache_k=c.empty(3, HKV, SLOTS, D))
    t.bad("cache_v slots", f"cache_v has shape [{B}, {HKV}, 32, {D}], expected [{B}, {HKV}, {SLOTS}, {D}]",
          cache_v=c.empty(B, HKV, 32, D))
    t.bad("q heads not a multiple of the KV heads", f"q heads {HQ} must be a multiple of the KV heads 3 "
          "(cache_k dimension 1)", cache_k=c.empty(B, 3, SLOTS, D), cache_v=c.empty(B, 3, SLOTS, D))
    t.bad("tail_k tokens", f"tail_k has shape [{B}, {HKV}, 5, {D}], expected [{B}, {HKV}, {T}, {D}]",
          tail_k=c.empty(B, HKV, 5, D))
    t.bad("tail_v on the host", cuda_msg("tail_v"), tail_v=c.host(base["tail_v"]))
    t.bad("out in the q layout", f"out has shape [{B}, {HQ}, {T}, {D}], expected [{B}, {T}, {HQ}, {D}]",
          out=c.empty(B, HQ, T, D))
    t.bad("out dtype", "out has dtype float32, expected bfloat16", out=c.empty(B, T, HQ, D, dtype=F32))
    t.bad("prefix_lens on the host", cuda_msg("prefix_lens"), prefix_lens=c.host(base["prefix_lens"]))
    t.bad("prefix_lens int64", "prefix_lens has dtype int64, expected int32", prefix_lens=c.empty(B, dtype=I64))
    t.bad("prefix_lens 2-d", f"prefix_lens has shape [{B}, 1], expected 1 dimensions",
          prefix_lens=c.empty(B, 1, dtype=I32))
    t.bad("prefix_lens length", f"prefix_lens has shape [3], expected size {B} in dimension 0 (batch)",
          prefix_lens=c.empty(3, dtype=I32))
    t.bad("prefix_lens strided", f"prefix_lens must be contiguous (shape [{B}])",
          prefix_lens=c.strided_vector(B, dtype=I32))
    t.bad("empty batch", "batch = 0 must be in [1, 65535]", q=c.empty(0, HQ, T, D), cache_k=c.empty(0, HKV, SLOTS, D),
          cache_v=c.empty(0, HKV, SLOTS, D), tail_k=c.empty(0, HKV, T, D), tail_v=c.empty(0, HKV, T, D),
          out=c.empty(0, T, HQ, D), prefix_lens=c.empty(0, dtype=I32))
    t.bad("no queries", "queries (T) = 0 must be in [1, 16777216]",
          q=c.empty(B, HQ, 0, D), tail_k=c.empty(B, HKV, 0, D),
          tail_v=c.empty(B, HKV, 0, D), out=c.empty(B, 0, HQ, D))
    t.bad("negative window", "window = -1 must be in [0, 1073741824]", window=-1)
    t.bad("ring larger than the cache", f"ring_size = {SLOTS + 1} must be in [0, {SLOTS}]", ring_size=SLOTS + 1)
    t.bad("negative ring", f"ring_size = -1 must be in [0, {SLOTS}]", ring_size=-1)
    t.bad("negative max_prefix", f"max_prefix = -1 must be in [0, {2**30 - T}]", max_prefix=-1)
    t.bad("ring smaller than the prefix", "the ring of 16 slots cannot hold the 20 visible prefix positions "
          "(window 0, max_prefix 20)", ring_size=16, max_prefix=20)
    t.bad("ring smaller than the window", "the ring of 3 slots cannot hold the 4 visible prefix positions "
          f"(window 5, max_prefix {PREFIX})", ring_size=3, window=5)
    t.bad("max_prefix past the cache",
          f"max_prefix {SLOTS + 1} exceeds the cache's {SLOTS} slots (cache_k dimension 2)",
          max_prefix=SLOTS + 1)
    t.bad("valid on the host", cuda_msg("valid"), valid=c.host(torch.ones(B, SLOTS, dtype=BOOL, device=c.dev)))
    t.bad("valid int32", "valid has dtype int32, expected bool or uint8", valid=c.empty(B, SLOTS, dtype=I32))
    t.bad("valid 1-d", f"valid has shape [{SLOTS}], expected 2 dimensions", valid=c.empty(SLOTS, dtype=BOOL))
    t.bad("valid batch", f"valid has shape [1, {SLOTS}], expected size {B} in dimension 0 (batch)",
          valid=c.empty(1, SLOTS, dtype=BOOL))
    t.bad("valid too short", f"valid has 5 positions, expected at least {PREFIX}", valid=c.empty(B, 5, dtype=BOOL))
    t.bad("valid too short for the tail", f"valid has 12 positions, expected at least {PREFIX + T}",
          valid=c.empty(B, 12, dtype=U8), valid_tail=True)
    t.bad("valid strided", "valid must be contiguous in its last dimension",
          valid=c.empty(B, SLOTS, 2, dtype=BOOL)[..., 0])
    t.bad("no splits", f"num_splits = 0 must be in [1, {65535 // B}]", num_splits=0)
    t.bad("no split tiles", "split_tiles = 0 must be in [1, 1073741824]", split_tiles=0)
    # A one-slot cache whose slot stride is 2^28 elements (a view: the stride of a size-1 dimension needs no storage).
    one_slot = c.empty(B, HKV, 1, D)
    far = one_slot.as_strided(one_slot.shape, (HKV * D, D, 2**28, 1))
    t.bad("cache_k slot stride past 2^28", "cache_k slot stride = 268435456 must be in [0, 268435455]",
          cache_k=far, cache_v=one_slot, max_prefix=0)
    t.bad("splits do not cover the keys", "num_splits 1 x split_tiles 1 does not cover the 2 key tiles of 64 keys",
          max_prefix=60)
    part_o = c.empty(2, B, HQ, T, D, dtype=F32)
    part_lse = c.empty(2, B, HQ, T, dtype=F32)
    import dgemma._C as C

    q_tiles = -(-T // C.attention_tile_shape(D)[0])
    counters = torch.zeros(B, HQ, q_tiles, dtype=I32, device=c.dev)
    split = dict(num_splits=2, part_o=part_o, part_lse=part_lse, split_counters=counters)
    need = "num_splits > 1 needs the part_o, part_lse and split_counters workspaces"
    t.bad("split without part_o", need, **{**split, "part_o": None})
    t.bad("split without part_lse", need, **{**split, "part_lse": None})
    t.bad("split without split_counters", need, **{**split, "split_counters": None})
    t.bad("part_o on the host", cuda_msg("part_o"), **{**split, "part_o": c.host(part_o)})
    t.bad("part_lse dtype", "part_lse has dtype bfloat16, expected float32",
          **{**split, "part_lse": c.empty(2, B, HQ, T)})
    t.bad("part_o strided", f"part_o must be contiguous (shape [2, {B}, {HQ}, {T}, {D}])",
          **{**split, "part_o": c.empty(2, B, HQ, D, T, dtype=F32).transpose(3, 4)})
    t.bad("part_o splits", f"part_o has shape [3, {B}, {HQ}, {T}, {D}], expected [2, {B}, {HQ}, {T}, {D}]",
          **{**split, "part_o": c.empty(3, B, HQ, T, D, dtype=F32)})
    t.bad("part_lse tokens", f"part_lse has shape [2, {B}, {HQ}, 4], expected [2, {B}, {HQ}, {T}]",
          **{**split, "part_lse": c.empty(2, B, HQ, 4, dtype=F32)})
    t.bad("split_counters on the host", cuda_msg("split_counters"),
          **{**split, "split_counters": c.host(counters)})
    t.bad("split_counters int64", "split_counters has dtype int64, expected int32",
          **{**split, "split_counters": counters.long()})
    t.bad("split_counters query tiles",
          f"split_counters has shape [{B}, {HQ}, {q_tiles + 1}], expected [{B}, {HQ}, {q_tiles}]",
          **{**split, "split_counters": torch.zeros(B, HQ, q_tiles + 1, dtype=I32, device=c.dev)})
    t.bad("impl unknown", "attention impl 3 is not an implementation (expected 0 mma.sync, 1 wgmma or 2 "
          "wgmma_deep)", impl=3)
    packed_tiles = -(-(HQ // HKV) * T // C.attention_tile_shape(D, 1)[0])
    t.bad("wgmma with the mma.sync kernel's counters",
          f"split_counters has shape [{B}, {HQ}, {q_tiles}], expected [{B}, {HKV}, {packed_tiles}]",
          **split, impl=1)
    t.bad("q is None", not_tensor("q"), q=None)
    t.bad("prefix_lens is a list", not_tensor("prefix_lens", "list"), prefix_lens=[PREFIX] * B)
    t.type_error("max_prefix is a float", "max_prefix=1.5", max_prefix=1.5)
    t.type_error("causal is a string", "causal='yes'", causal="yes")

    def check(_):
        out = base["out"]
        keys = torch.cat((cache_k[:, :, :PREFIX], base["tail_k"]), dim=2)
        values = torch.cat((cache_v[:, :, :PREFIX], base["tail_v"]), dim=2)
        ref = ReferenceOps().attention(base["q"].float(), keys.float(), values.float(), None)
        assert torch.isfinite(out.float()).all(), "the kernel read a cache slot past the prefix"
        assert ((out.float() - ref).abs().max() / ref.abs().max()).item() <= 2e-2

    t.check = check
    return t


# -- vocabulary head -------------------------------------------------------------------------------

VB, VC, VV, VH = 2, 5, 130, 64


def vocab_head_workspace_bytes_table(c: Ctx) -> Table:
    t = Table("vocab_head_workspace_bytes", dict(batch=VB, canvas=VC, vocab=VV, hidden=VH, with_soft=True,
                                                 device=c.idx, impl=1, fp8_soft=False))
    t.bad("no batch", "batch 0 must be in [1, 268435456]", batch=0)
    t.bad("batch too large", f"batch {2**28 + 1} must be in [1, 268435456]", batch=2**28 + 1)
    t.bad("no canvas", "canvas length 0 must be in [1, 1024]", canvas=0)
    t.bad("canvas too long", "canvas length 1025 must be in [1, 1024] (one CTA ranks a sequence's positions)",
          canvas=1025)
    t.bad("no vocab", "vocab size 0 must be in [1, 1073741824]", vocab=0)
    t.bad("hidden 32", "hidden size 32 must be a positive multiple of 64 up to 65536", hidden=32)
    t.bad("hidden 100", "hidden size 100 must be a positive multiple of 64 up to 65536", hidden=100)
    t.bad("hidden too large", "hidden size 65600 must be a positive multiple of 64 up to 65536", hidden=65600)
    # (None would convert: pybind11 reads None as False for a bool parameter.)
    t.type_error("with_soft is a string", "with_soft='yes'", with_soft="yes")
    t.bad("impl 2", "impl 2 must be 0 (mma.sync) or 1 (wgmma)", impl=2)
    t.bad("impl -1", "impl -1 must be 0 (mma.sync) or 1 (wgmma)", impl=-1)
    t.bad("FP8 soft on mma.sync", "the FP8 self-conditioning pass runs only on impl 1 (wgmma), got impl 0",
          fp8_soft=True, impl=0, vocab=256)
    t.bad("FP8 soft without soft", "the FP8 self-conditioning pass needs the self-conditioning pass (soft)",
          fp8_soft=True, with_soft=False, vocab=256)
    t.bad("FP8 soft with vocab 130", "the FP8 self-conditioning pass needs a vocabulary that is a multiple of 8, "
          "got 130", fp8_soft=True)

    t.check = _positive_size
    return t


def vocab_head_step_table(c: Ctx) -> Table:
    from dgemma.vocab_head import processed_logits

    h = c.randn(VB, VC, VH)
    embed = c.randn(VV, VH, scale=3.0 / VH ** 0.5)
    nbytes = c.workspace_bytes("vocab_head_workspace_bytes", VB, VC, VV, VH, True)
    f32 = lambda *s: c.empty(*s, dtype=F32)  # noqa: E731
    i64 = lambda *s: c.empty(*s, dtype=I64)  # noqa: E731
    flag = lambda *s: c.empty(*s, dtype=BOOL)  # noqa: E731
    t = Table("vocab_head_step", dict(
        hidden=h, embed=embed, prev_argmax=torch.full((VB, VC), -1, dtype=I64, device=c.dev), finished=None,
        max_logit=f32(VB, VC), lse=f32(VB, VC), entropy=f32(VB, VC), argmax=i64(VB, VC), sample=i64(VB, VC),
        accepted=flag(VB, VC), next_canvas=i64(VB, VC), mean_entropy=f32(VB), stable=flag(VB), finished_out=flag(VB),
        soft=c.empty(VB, VC, VH), workspace=c.empty(nbytes, dtype=U8), temperature=0.8, softcap=30.0,
        entropy_bound=0.1, confidence=0.005, soft_scale=8.0, seed=1, step=0, stream=0, device_seed_step=None,
        device_temperature=None, impl=0, embed_fp8=None, embed_fp8_scale=None))
    doc = "(see the documented shape)"
    t.bad("hidden on the host", cuda_msg("hidden"), hidden=c.host(h))
    t.bad("hidden float32", "hidden has dtype float32, expected bfloat16", hidden=c.empty(VB, VC, VH, dtype=F32))
    t.bad("hidden 2-d", f"hidden has shape [{VB * VC}, {VH}], expected 3 dimensions", hidden=c.empty(VB * VC, VH))
    t.bad("hidden transposed", f"hidden must be contiguous (shape [{VB}, {VC}, {VH}])",
          hidden=c.empty(VB, VH, VC).transpose(1, 2))
    t.bad("embed on the host", cuda_msg("embed"), embed=c.host(embed))
    t.bad("embed float32", "embed has dtype float32, expected bfloat16", embed=c.empty(VV, VH, dtype=F32))
    t.bad("embed 1-d", f"embed has shape [{VV * VH}], expected 2 dimensions", embed=c.empty(VV * VH))
    t.bad("embed hidden", f"embed has shape [{VV}, 128], expected size {VH} in dimension 1 {doc}",
          embed=c.empty(VV, 128))
    t.bad("embed transposed", f"embed must be contiguous (shape [{VV}, {VH}])", embed=c.transposed(VV, VH))
    t.bad("canvas too long", "canvas length 1025 must be in [1, 1024]", hidden=c.empty(VB, 1025, VH))
    t.bad("hidden size 32", "hidden size 32 must be a positive multiple of 64 up to 65536",
          hidden=c.empty(VB, VC, 32), embed=c.empty(VV, 32))
    t.bad("empty vocab", "vocab size 0 must be in [1, 1073741824]", embed=c.empty(0, VH))
    t.bad("empty batch", "batch 0 must be in [1, 268435456]", hidden=c.empty(0, VC, VH))
    t.bad("hidden misaligned", "hidden must be 16-byte aligned (a view at an odd offset? call .clone())",
          hidden=c.misaligned(VB, VC, VH))
    t.bad("embed misaligned", "embed must be 16-byte aligned", embed=c.misaligned(VV, VH))
    t.bad("prev_argmax on the host", cuda_msg("prev_argmax"), prev_argmax=c.host(t.base["prev_argmax"]))
    t.bad("prev_argmax int32", "prev_argmax has dtype int32, expected int64", prev_argmax=c.empty(VB, VC, dtype=I32))
    t.bad("prev_argmax canvas", f"prev_argmax has shape [{VB}, 4], expected size {VC} in dimension 1 {doc}",
          prev_argmax=i64(VB, 4))
    t.bad("finished on the host", cuda_msg("finished"), finished=c.host(flag(VB)))
    t.bad("finished uint8", "finished has dtype uint8, expected bool", finished=c.empty(VB, dtype=U8))
    t.bad("finished length", f"finished has shape [3], expected size {VB} in dimension 0 {doc}", finished=flag(3))
    t.bad("max_logit on the host", cuda_msg("max_logit"), max_logit=c.host(t.base["max_logit"]))
    t.bad("lse dtype", "lse has dtype bfloat16, expected float32", lse=c.empty(VB, VC))
    t.bad("entropy 3-d", f"entropy has shape [{VB}, {VC}, 1], expected 2 dimensions", entropy=f32(VB, VC, 1))
    t.bad("argmax strided", f"argmax must be contiguous (shape [{VB}, {VC}])", argmax=c.transposed(VB, VC, dtype=I64))
    t.bad("sample int32", "sample has dtype int32, expected int64", sample=c.empty(VB, VC, dtype=I32))
    t.bad("next_canvas on the host", cuda_msg("next_canvas"), next_canvas=c.host(t.base["next_canvas"]))
    t.bad("accepted uint8", "accepted has dtype uint8, expected bool", accepted=c.empty(VB, VC, dtype=U8))
    t.bad("mean_entropy 2-d", f"mean_entropy has shape [{VB}, 1], expected 1 dimensions", mean_entropy=f32(VB, 1))
    t.bad("stable dtype", "stable has dtype float32, expected bool", stable=f32(VB))
    t.bad("finished_out length", f"finished_out has shape [1], expected size {VB} in dimension 0 {doc}",
          finished_out=flag(1))
    t.bad("device_seed_step on the host", cuda_msg("device_seed_step"), device_seed_step=torch.zeros(2, dtype=I64))
    t.bad("device_seed_step int32", "device_seed_step has dtype int32, expected int64",
          device_seed_step=c.empty(2, dtype=I32))
    t.bad("device_seed_step length", f"device_seed_step has shape [3], expected size 2 in dimension 0 {doc}",
          device_seed_step=i64(3))
    t.bad("device_temperature bf16", "device_temperature has dtype bfloat16, expected float32",
          device_temperature=c.empty(1))
    t.bad("device_temperature 2-d", "device_temperature has shape [1, 1], expected 1 dimensions",
          device_temperature=f32(1, 1))
    t.bad("soft dtype", "soft has dtype float32, expected bfloat16", soft=c.empty(VB, VC, VH, dtype=F32))
    t.bad("soft shape", f"soft has shape [{VB}, {VC}, 32], expected size {VH} in dimension 2 {doc}",
          soft=c.empty(VB, VC, 32))
    t.bad("soft misaligned", "soft must be 16-byte aligned", soft=c.misaligned(VB, VC, VH))
    t.bad("soft on the host", cuda_msg("soft"), soft=c.host(t.base["soft"]))
    t.bad("temperature zero", "temperature must be a positive finite number, got 0.000000", temperature=0.0)
    t.bad("temperature infinite", "temperature must be a positive finite number, got inf", temperature=float("inf"))
    t.add("temperature NaN", re.escape("temperature must be a positive finite number, got ") + "-?nan", ValueError,
          temperature=float("nan"))
    t.bad("softcap negative", "softcap must be a positive finite number, got -1.000000", softcap=-1.0)
    t.add("entropy_bound NaN", re.escape("entropy_bound must be a finite number, got ") + "-?nan", ValueError,
          entropy_bound=float("nan"))
    t.bad("confidence infinite", "confidence must be a finite number, got inf", confidence=float("inf"))
    t.bad("soft_scale -inf", "soft_scale must be a finite number, got -inf", soft_scale=float("-inf"))
    _workspace_errors(t, c, nbytes, hint=" (vocab_head_workspace_bytes)")
    t.bad("hidden is None", not_tensor("hidden"), hidden=None)
    t.bad("lse is None", not_tensor("lse"), lse=None)
    t.type_error("negative seed", "seed=-1", seed=-1)
    t.type_error("step beyond uint32", "step=4294967296", step=2**32)
    t.bad("impl 3", "impl 3 must be 0 (mma.sync) or 1 (wgmma)", impl=3)
    fp8_table = c.empty(VH, 256, dtype=FP8)
    t.bad("embed_fp8 without its scale", "embed_fp8 and embed_fp8_scale must be given together", embed_fp8=fp8_table,
          impl=1)
    t.bad("embed_fp8_scale alone", "embed_fp8 and embed_fp8_scale must be given together",
          embed_fp8_scale=f32(VH), impl=1)
    t.bad("embed_fp8 on mma.sync", "embed_fp8 (the FP8 self-conditioning pass) runs only on impl 1 (wgmma), got "
          "impl 0", embed_fp8=fp8_table, embed_fp8_scale=f32(VH))
    t.bad("embed_fp8 without soft", "embed_fp8 (the FP8 self-conditioning pass) needs the self-conditioning pass "
          "(soft)", embed_fp8=fp8_table, embed_fp8_scale=f32(VH), soft=None, impl=1)
    t.bad("embed_fp8 with vocab 130", "embed_fp8 (the FP8 self-conditioning pass) needs a vocabulary that is a "
          "multiple of 8, got 130", embed_fp8=fp8_table, embed_fp8_scale=f32(VH), impl=1)
    # A workspace sized for the mma.sync kernels is checked against the wgmma plan's size.
    wgmma_bytes = int(c.lib.vocab_head_workspace_bytes(VB, VC, VV, VH, True, c.idx, 1))
    if wgmma_bytes > nbytes:
        t.bad("workspace of the other implementation", f"workspace has {nbytes} bytes, expected at least "
              f"{wgmma_bytes} (vocab_head_workspace_bytes)", impl=1)

    def check(_):
        b = t.base
        z = processed_logits(h, embed, 0.8)
        for name in ("max_logit", "lse", "entropy", "mean_entropy"):
            assert torch.isfinite(b[name]).all(), name
        assert torch.isfinite(b["soft"].float()).all()
        ref_max = z.amax(dim=-1)
        assert ((b["max_logit"] - ref_max).abs() / ref_max.abs().clamp_min(1e-3)).max().item() <= 2e-2
        for name in ("argmax", "sample", "next_canvas"):
            assert bool(((b[name] >= 0) & (b[name] < VV)).all()), name
        assert not bool(b["stable"].any())  # no previous argmax: nothing is stable on a first step

    t.check = check
    return t


def device_capability_table(c: Ctx) -> Table:
    n = torch.cuda.device_count()
    t = Table("device_capability", dict(device=c.idx))
    t.bad("device past the last", f"device {n} out of range: {n} CUDA device(s) visible", device=n)
    t.bad("negative device", f"device -1 out of range: {n} CUDA device(s) visible", device=-1)
    t.type_error("device is a string", "device='0'", device="0")

    def check(cap):
        assert tuple(cap[:2]) == torch.cuda.get_device_capability(c.idx)
        assert cap[2] == torch.cuda.get_device_properties(c.idx).multi_processor_count

    t.check = check
    return t


BUILDERS = {
    "rms_norm": rms_norm_table,
    "rms_norm_fp8": rms_norm_fp8_table,
    "residual_norm": residual_norm_table,
    "fp8_quantize_rows": fp8_quantize_rows_table,
    "fp8_linear_workspace_bytes": fp8_linear_workspace_bytes_table,
    "fp8_linear": fp8_linear_table,
    "fp8_gated_mlp_workspace_bytes": fp8_gated_mlp_workspace_bytes_table,
    "fp8_gated_mlp": fp8_gated_mlp_table,
    "moe_route": moe_route_table,
    "moe_plan": moe_plan_table,
    "moe_fp8_workspace_bytes": moe_fp8_workspace_bytes_table,
    "moe_fp8": moe_fp8_table,
    "moe_fp8_workspace_layout": moe_fp8_workspace_layout_table,
    "ffn_residual_experts": ffn_residual_experts_table,
    "embed_norm": embed_norm_table,
    "qkv_prep": qkv_prep_table,
    "attention_tile_shape": attention_tile_shape_table,
    "attention_forward": attention_forward_table,
    "vocab_head_workspace_bytes": vocab_head_workspace_bytes_table,
    "vocab_head_step": vocab_head_step_table,
    "device_capability": device_capability_table,
}


def run_case(fn, case: Case) -> str | None:
    """None when ``fn(**case.kwargs)`` raised the expected exception with the expected message."""
    try:
        fn(**case.kwargs)
    except Exception as e:  # noqa: BLE001 - the exact type is compared below
        if type(e) is not case.exc:
            return f"{case.label}: raised {type(e).__name__}({e}), expected {case.exc.__name__}"
        if re.search(case.match, str(e)) is None:
            return f"{case.label}: message {str(e)!r} does not match {case.match!r}"
        return None
    return f"{case.label}: did not raise (expected {case.exc.__name__})"


@pytest.fixture(scope="module")
def ctx():
    from dgemma import _ext

    lib = _ext.require_cuda()
    return Ctx(lib, torch.device("cuda", torch.cuda.current_device()))


def test_every_tensor_entry_point_has_a_table():
    from dgemma import _ext

    lib = _ext.require_cuda()
    names = {n for n in dir(lib) if not n.startswith("_") and callable(getattr(lib, n))}
    assert names - NO_ERROR_PATH == set(OPS) == set(BUILDERS)


@pytest.mark.parametrize("op", OPS)
def test_launcher_errors_raise_repeatedly_then_the_op_runs(ctx, op):
    table = BUILDERS[op](ctx)
    assert table.cases, f"{op}: no error cases"
    fn = getattr(ctx.lib, op)
    torch.cuda.synchronize()
    # Each case once first, so that a wrong table entry fails with all its siblings listed.
    failures = [f for f in (run_case(fn, case) for case in table.cases) if f is not None]
    assert not failures, f"{op}:\n" + "\n".join(failures)
    for _ in range(REPEATS - 1):
        for case in table.cases:
            failure = run_case(fn, case)
            assert failure is None, f"{op}: {failure}"
    # The known-good call: every case above differs from it in one argument only.
    kwargs = dict(table.base)
    if "stream" in kwargs:
        kwargs["stream"] = ctx.stream()
    result = fn(**kwargs)
    torch.cuda.synchronize()
    table.check(result)
    torch.cuda.synchronize()
