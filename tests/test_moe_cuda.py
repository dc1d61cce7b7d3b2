"""GPU tests of the FP8/MoE kernels (skipped without a usable sm_90 GPU). Real model shapes: hidden 2816,
128 experts, top-8, expert intermediate 704.

Each FP8 kernel is judged against a reference that quantises exactly as the kernel does
(tests/moe_reference.py: per-token activation scales, per-channel weight scales, the same rounding, the
intermediate gelu(gate)*up re-quantised in the same place) with a tight bound, and separately against the
unquantised fp32 reference on dequantised weights, loosely, so the end-to-end FP8 error stays reported.
"""

import math

import pytest
import torch

import moe_reference as mref
from dgemma import quant
from dgemma.ops import cuda_moe
from dgemma.ops.reference import ReferenceOps
from dgemma.quant import Fp8Weight, quantize_weight

pytestmark = pytest.mark.gpu

H, I, E, K = 2816, 704, 128, 8
TOKEN_COUNTS = (1, 7, 255, 256, 1000, 2048)
# Against the reference that quantises as the kernels do (and sums the E4M3 products exactly): what is left is the
# tensor cores' accumulation and the ulp flips it causes in the bf16/E4M3 roundings downstream. The CUTLASS GEMMs use
# Hopper's fast FP8 accumulation (no periodic promotion to fp32; about 14 bits kept), so a GEMM output differs from
# the correctly rounded sum by a bf16 ulp now and then (bench/fp8_gemm_precision.py measures how often). One GEMM
# (linear_fp8) stays within 1e-2. Where an intermediate is re-quantised to E4M3 (gelu·up before the down GEMM: the
# gated MLP, the experts), such a flip before it moves an intermediate by a whole E4M3 step (6-12 %) in a few % of
# the values: about 1.5 % relative error on an H200 (measured 1.3-2.2 %), bounded at 3e-2. A wrong scale, expert or
# row costs far more (a one-E4M3-step scale error alone is 6 %).
QUANT_REL_TOL = 1e-2
QUANT_REL_TOL_REQUANTISED = 3e-2
QUANT_DIFF_TOL = 1e-3
# Against the unquantised fp32 reference (loose, end to end): one per-token E4M3 quantisation of the
# activations costs ~2.7 % relative error, two in a row (MLP, experts) ~4.6 %.
FP32_TOL_ONE_QUANT = 3.5e-2
FP32_TOL_TWO_QUANTS = 6e-2
POISON_INT = -(2 ** 31)  # never written by the plan kernel (ids are >= -1)

rel_err = mref.rel_err


def assert_matches_quantized_reference(out: torch.Tensor, ref: torch.Tensor, what: str, *, requantised: bool = True):
    """``requantised``: the pipeline re-quantises an intermediate (gated MLP, experts); False for one GEMM."""
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    err, diff = mref.rel_err(out, ref), mref.calc_diff(out, ref)
    tol = QUANT_REL_TOL_REQUANTISED if requantised else QUANT_REL_TOL
    assert err <= tol and diff <= QUANT_DIFF_TOL, (
        f"{what}: relative error {err:.3g} (bound {tol}), calc_diff {diff:.3g} (bound {QUANT_DIFF_TOL}) "
        "against the FP8-quantised reference")


def assert_fp8_error_vs_fp32(out: torch.Tensor, ref32: torch.Tensor, tol: float, what: str):
    err = rel_err(out, ref32)
    assert err <= tol, f"{what}: end-to-end FP8 relative error {err:.3g} against fp32 exceeds {tol}"


def poison_workspaces():
    for ws in cuda_moe._workspaces.values():
        ws.fill_(0xFF)  # 0xFF is NaN in E4M3 and a NaN pattern in bf16/fp32


def nan_like(shape, dtype=torch.bfloat16):
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


@pytest.fixture(scope="module")
def experts():
    g = torch.Generator(device="cuda").manual_seed(0)
    gate_up = quantize_weight(torch.randn(E, 2 * I, H, device="cuda", generator=g).mul_(H ** -0.5).bfloat16())
    down = quantize_weight(torch.randn(E, H, I, device="cuda", generator=g).mul_(I ** -0.5).bfloat16())
    return gate_up, down


@pytest.fixture(params=["contiguous", "ptr_array"])
def pipeline(request, monkeypatch):
    """Both MoE pipelines of _C.moe_fp8: the contiguous expert GEMM (default) and the pointer-array grouped GEMM."""
    if request.param == "ptr_array":
        monkeypatch.setenv("DGEMMA_DISABLE_KERNELS", "moe_contiguous")
    else:
        monkeypatch.delenv("DGEMMA_DISABLE_KERNELS", raising=False)
    return request.param


def random_routing(n, seed, *, experts_used=E, top_k=K):
    g = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.rand(n, experts_used, device="cuda", generator=g).argsort(dim=1)[:, :top_k].int()
    weights = torch.rand(n, top_k, device="cuda", generator=g) + 0.1
    return ids, weights / weights.sum(1, keepdim=True)


def tokens(n, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(n, H, device="cuda", generator=g).bfloat16()


def run_moe(x, ids, weights, gate_up, down):
    cuda_moe.moe_fp8(x, ids, weights, gate_up, down)  # sizes the cached workspace
    poison_workspaces()
    out = nan_like((x.shape[0], H))
    cuda_moe.moe_fp8(x, ids, weights, gate_up, down, out=out)
    torch.cuda.synchronize()
    return out


def reference_moe(x, ids, weights, gate_up, down):
    """The unquantised fp32 reference (dequantised weights, fp32 activations)."""
    return ReferenceOps().moe(x.float(), ids.long(), weights, gate_up, down)


def quantized_moe_reference(x, ids, weights, gate_up, down):
    """The FP8-faithful reference of the pipeline moe_fp8 runs now (see the ``pipeline`` fixture)."""
    from dgemma import _ext

    ref = mref.moe_fp8 if "moe_contiguous" in _ext.disabled_kernels() else mref.moe_fp8_contiguous
    return ref(x, ids, weights, gate_up, down)


def check_moe(x, ids, weights, gate_up, down, what):
    out = run_moe(x, ids, weights, gate_up, down)
    assert_matches_quantized_reference(out, quantized_moe_reference(x, ids, weights, gate_up, down), what)
    assert_fp8_error_vs_fp32(out, reference_moe(x, ids, weights, gate_up, down), FP32_TOL_TWO_QUANTS, what)
    return out


# -- quantiser -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rows,cols", [(1, 16), (7, 2816), (255, 4096), (33, 8192)])
def test_quantize_rows_bit_exact(rows, cols):
    g = torch.Generator(device="cuda").manual_seed(rows)
    x = (torch.randn(rows, cols, device="cuda", generator=g) * torch.rand(rows, 1, device="cuda", generator=g) * 9)
    x = x.bfloat16()
    if rows > 1:
        x[0] = 0  # an all-zero row keeps a finite scale
    q, scale = cuda_moe.quantize_rows(x)
    # NOTE: the reference divides tensor by tensor on the device (an IEEE division like the kernel's);
    # dividing by a Python number would become a multiplication by an inexact fp32 reciprocal.
    q_ref, scale_ref = quant.quantize_rows(x)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("shape,weighted", [((1, 16), True), ((7, 2816), True), ((2, 33, 2816), False),
                                            ((255, 512), True), ((3, 4096), False)])
def test_rms_norm_fp8_bit_exact(shape, weighted):
    """The fused norm + quantisation equals the CUDA norm then the CUDA quantiser, and the CPU reference of both."""
    from dgemma.ops import cuda

    g = torch.Generator(device="cuda").manual_seed(shape[-1] + len(shape))
    x = (torch.randn(*shape, device="cuda", generator=g) * 5).bfloat16()
    w = (torch.rand(shape[-1], device="cuda", generator=g) + 0.5).bfloat16() if weighted else None
    rows = cuda_moe.rms_norm_fp8(x, w, 1e-6)
    assert rows.lead == tuple(shape[:-1]) and rows.q.shape == (math.prod(shape[:-1]), shape[-1])
    q2, s2 = cuda_moe.quantize_rows(cuda.rms_norm(x, w, 1e-6).reshape(-1, shape[-1]))
    assert torch.equal(rows.scale, s2) and torch.equal(rows.q.view(torch.uint8), q2.view(torch.uint8))
    q3, s3 = quant.quantize_rows(ReferenceOps().rms_norm(x.cpu(), None if w is None else w.cpu(), 1e-6)
                                 .reshape(-1, shape[-1]))
    assert torch.equal(rows.scale.cpu(), s3) and torch.equal(rows.q.cpu().view(torch.uint8), q3.view(torch.uint8))
    # Rows evenly strided but not packed (a column slice of a wider tensor) read the same values.
    wide = torch.zeros(*shape[:-1], shape[-1] + 64, dtype=torch.bfloat16, device="cuda")
    wide[..., :shape[-1]] = x
    strided = cuda_moe.rms_norm_fp8(wide[..., :shape[-1]], w, 1e-6)
    assert torch.equal(strided.q.view(torch.uint8), rows.q.view(torch.uint8))


@pytest.mark.parametrize("rows", [1, 7, 256, 333])
def test_linear_and_mlp_take_prequantised_rows(rows):
    """A GEMM fed by rms_norm_fp8 equals the same GEMM fed the bf16 norm (it quantises identically), and the gated
    MLP's one-GEMM gate/up (rows adjacent, quant.fuse_rows) equals its two-GEMM form."""
    from dgemma.ops import cuda

    g = torch.Generator(device="cuda").manual_seed(rows)
    x = (torch.randn(rows, H, device="cuda", generator=g) * 2).bfloat16()
    norm = (torch.rand(H, device="cuda", generator=g) + 0.5).bfloat16()
    w = quantize_weight((torch.randn(4096, H, device="cuda", generator=g) * H ** -0.5).bfloat16())
    pre = cuda_moe.rms_norm_fp8(x, norm, 1e-6)
    normed = cuda.rms_norm(x, norm, 1e-6)
    assert torch.equal(cuda_moe.linear_fp8(pre, w), cuda_moe.linear_fp8(normed, w))
    inter = 2112
    gate, up = (quantize_weight((torch.randn(inter, H, device="cuda", generator=g) * H ** -0.5).bfloat16())
                for _ in range(2))
    down = quantize_weight((torch.randn(H, inter, device="cuda", generator=g) * inter ** -0.5).bfloat16())
    assert not quant.rows_adjacent(gate, up)
    two = cuda_moe.gated_mlp_fp8(normed, gate, up, down)
    _, (fgate, fup) = quant.fuse_rows([gate, up])
    assert quant.rows_adjacent(fgate, fup)
    one = cuda_moe.gated_mlp_fp8(pre, fgate, fup, down)
    # Same products per element; only the tile an output column falls in differs.
    assert rel_err(one, two) <= 1e-3, rel_err(one, two)
    assert_matches_quantized_reference(one, mref.gated_mlp_fp8(normed, gate, up, down), f"fused gate/up rows={rows}")


@pytest.mark.parametrize("lead", [(1, 256), (3, 77)])
def test_residual_mlp_writes_the_mlp_input_with_the_residual(lead):
    """CudaOps.residual_mlp (one residual kernel that also quantises the MLP's normed input) equals the residual
    kernel, then rms_norm_fp8, then the MLP: bit for bit."""
    from dgemma.ops import cuda
    from dgemma.ops.cuda import CudaOps

    g = torch.Generator(device="cuda").manual_seed(lead[1])
    x = (torch.randn(*lead, H, device="cuda", generator=g) * 3).bfloat16()
    y = torch.randn(*lead, H, device="cuda", generator=g).bfloat16()
    w_post, w_pre = ((torch.rand(H, device="cuda", generator=g) + 0.5).bfloat16() for _ in range(2))
    inter = 2112
    _, (gate, up) = quant.fuse_rows([quantize_weight((torch.randn(inter, H, device="cuda", generator=g)
                                                      * H ** -0.5).bfloat16()) for _ in range(2)])
    down = quantize_weight((torch.randn(H, inter, device="cuda", generator=g) * inter ** -0.5).bfloat16())
    new_x, mlp = CudaOps().residual_mlp(x, y, w_post, 1e-6, w_pre, gate, up, down)
    ref_x = cuda.residual_norm(x, y, w_post, 1e-6)
    assert torch.equal(new_x, ref_x)
    assert torch.equal(mlp, cuda_moe.gated_mlp_fp8(cuda_moe.rms_norm_fp8(ref_x, w_pre, 1e-6), gate, up, down))


def test_ffn_residual_writes_the_next_layers_attention_input():
    """CudaOps.ffn_residual_qkv (the feed-forward residual kernel also quantising the next layer's normed input)
    equals the residual kernel then rms_norm_fp8, bit for bit, and project_qkv takes those rows."""
    from dgemma.ops import cuda
    from dgemma.ops.cuda import CudaOps
    from dgemma.random_checkpoint import random_engine

    eng = random_engine("small", dtype=torch.bfloat16, device="cuda", backend="cuda", quantization="fp8")
    nxt, spec = eng.model.w.layers[1], eng.config.layers[1]
    hid = eng.config.hidden_size
    g = torch.Generator(device="cuda").manual_seed(5)
    x, mlp, moe = ((torch.randn(2, 37, hid, device="cuda", generator=g) * 2).bfloat16() for _ in range(3))
    w_mlp, w_moe, w_ff = ((torch.rand(hid, device="cuda", generator=g) + 0.5).bfloat16() for _ in range(3))
    scalar = torch.full((1,), 0.8, dtype=torch.bfloat16, device="cuda")
    new_x, h = CudaOps().ffn_residual_qkv(x, mlp, moe, w_mlp, w_moe, w_ff, scalar, 1e-6, nxt.input_norm, nxt.attn,
                                          spec.head_dim)
    ref_x = cuda.residual_norm(x, mlp, w_mlp, 1e-6, moe, w_moe, w_ff, scalar)
    assert torch.equal(new_x, ref_x) and isinstance(h, quant.Fp8Rows)
    ref_h = cuda_moe.rms_norm_fp8(ref_x, nxt.input_norm, 1e-6)
    assert torch.equal(h.q.view(torch.uint8), ref_h.q.view(torch.uint8)) and torch.equal(h.scale, ref_h.scale)
    cos, sin = eng.model._rope_tables(torch.arange(37, device="cuda")[None], torch.bfloat16)[spec.kind]
    ops = CudaOps()
    got = ops.project_qkv(h, nxt.attn, spec.head_dim, cos, sin, 1e-6)
    want = ops.norm_project_qkv(ref_x, nxt.input_norm, nxt.attn, spec.head_dim, cos, sin, 1e-6)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# -- router --------------------------------------------------------------------------------------


def router_inputs(n, seed, *, experts=E):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(n, H, device="cuda", generator=g) * 3).bfloat16()
    scale = (1 + 0.1 * torch.randn(H, device="cuda", generator=g)).bfloat16()
    proj = (torch.randn(experts, H, device="cuda", generator=g) * H ** -0.5 * 8).bfloat16()
    expert_scale = (1 + 0.2 * torch.rand(experts, device="cuda", generator=g)).bfloat16()
    return x, scale, proj, expert_scale


def chosen_mask(ids, experts):
    return torch.zeros(ids.shape[0], experts, dtype=torch.bool, device=ids.device).scatter_(1, ids.long(), True)


def check_routing(w, ids, w_ref, ids_ref, logits_ref, *, max_set_mismatch=0.02):
    """Valid, distinct ids; the dense [tokens, experts] weights equal the reference's on rows that chose
    the same experts; other rows (few) differ only by near-ties: each expert the kernel chose has a
    reference logit within two bf16 ulps of the reference's k-th."""
    experts = logits_ref.shape[1]
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert ((ids >= 0) & (ids < experts)).all(), "expert id out of range"
    srt = ids.long().sort(1).values
    assert (srt[:, 1:] != srt[:, :-1]).all(), "an expert chosen twice for one token"
    assert torch.isfinite(w).all()
    same = (chosen_mask(ids, experts) == chosen_mask(ids_ref, experts)).all(1)
    allowed = max(2, math.ceil(max_set_mismatch * len(same)))
    assert int((~same).sum()) <= allowed, f"{int((~same).sum())} of {len(same)} rows chose other experts"
    got, want = mref.dense_routing(ids, w, experts)[same], mref.dense_routing(ids_ref, w_ref, experts)[same]
    # The kernel sums a logit's products in another order than the exact reference: now and then that flips the
    # logit's bf16 rounding by one ulp (|logit| 2^-8, about 1e-3 here), which moves the row's weights by as much.
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-6)
    loose = ~torch.isclose(got, want, rtol=1e-3, atol=1e-6)
    assert loose.float().mean().item() <= 1e-3, f"{int(loose.sum())} routing weights differ by more than 1e-3"
    lref = torch.nan_to_num(logits_ref, nan=float("-inf"))
    kth = lref.gather(1, ids_ref.long()).amin(1, keepdim=True)
    picked = lref.gather(1, ids.long())
    near = picked >= kth - mref.near_tie_tolerance(kth)
    assert near[~same].all(), "the kernel chose an expert that is not a near-tie of the reference's top-k"


@pytest.mark.parametrize("n", [1, 7, 255, 1000])
def test_route_matches_reference(n):
    x, scale, proj, expert_scale = router_inputs(n, seed=n)
    w, ids = cuda_moe.route(x, scale, proj, expert_scale, K, 1e-6)
    w_ref, ids_ref, logits = mref.route(x, scale, proj, expert_scale, K, 1e-6)
    check_routing(w, ids, w_ref, ids_ref, logits)


@pytest.mark.parametrize("n", [1, 7, 255, 1000])
def test_route_forms_the_attention_residual_exactly(n):
    """route(x, residual=(y, w)) stores x + rms_norm(y) * w bit-identical to the residual_norm kernel and routes it
    exactly as the router routes that stored tensor (the same weights and ids bit for bit)."""
    from dgemma.ops import cuda

    x, scale, proj, expert_scale = router_inputs(n, seed=n + 5)
    g = torch.Generator(device="cuda").manual_seed(n + 6)
    y = (torch.randn(n, H, device="cuda", generator=g) * 2).bfloat16()
    w = (torch.rand(H, device="cuda", generator=g) + 0.5).bfloat16()
    weights, ids, new_x = cuda_moe.route(x, scale, proj, expert_scale, K, 1e-6, residual=(y, w))
    assert torch.equal(new_x, cuda.residual_norm(x, y, w, 1e-6))
    w_plain, ids_plain = cuda_moe.route(new_x, scale, proj, expert_scale, K, 1e-6)
    assert torch.equal(ids, ids_plain) and torch.equal(weights, w_plain)


@pytest.mark.parametrize("experts", [64, 128, 256])
def test_a_token_routes_the_same_alone_and_in_any_batch(experts):
    """The tensor-core router sums each logit over fixed K chunks in one order whatever the launch (few tokens: one
    chunk per block of a thread-block cluster; many: all chunks in one block), so rows route bit-identically in a
    small batch and inside a large one, with and without the fused residual (a server's batched pass must give each
    request's tokens alone)."""
    x, scale, proj, expert_scale = router_inputs(1024, seed=77, experts=experts)
    w_all, ids_all = cuda_moe.route(x, scale, proj, expert_scale, K, 1e-6)
    for n in (1, 16, 100, 256):
        w, ids = cuda_moe.route(x[:n].contiguous(), scale, proj, expert_scale, K, 1e-6)
        assert torch.equal(ids, ids_all[:n]) and torch.equal(w, w_all[:n]), n
    g = torch.Generator(device="cuda").manual_seed(78)
    y = torch.randn(1024, H, device="cuda", generator=g).bfloat16()
    rw = (torch.rand(H, device="cuda", generator=g) + 0.5).bfloat16()
    w_all, ids_all, new_all = cuda_moe.route(x, scale, proj, expert_scale, K, 1e-6, residual=(y, rw))
    w, ids, new = cuda_moe.route(x[:200].contiguous(), scale, proj, expert_scale, K, 1e-6, residual=(y[:200], rw))
    assert torch.equal(new, new_all[:200]) and torch.equal(ids, ids_all[:200]) and torch.equal(w, w_all[:200])


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of the 1-D ``t`` starting 2 bytes past a 16-byte boundary (contiguous, so the launcher takes it)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:]
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


@pytest.mark.parametrize("experts", [64, 128, 256])
def test_route_element_passes_equal_the_16_byte_passes(experts):
    """The tensor-core router normalises rows in 16-byte chunks where every row it reads is 16-byte aligned, else
    element by element (here: a norm scale and residual weight 2 bytes off a 16-byte boundary); both passes sum in
    one order, so the weights, ids and fused residual rows are the same bits."""
    x, scale, proj, expert_scale = router_inputs(300, seed=91, experts=experts)
    g = torch.Generator(device="cuda").manual_seed(92)
    y = torch.randn(300, H, device="cuda", generator=g).bfloat16()
    rw = (torch.rand(H, device="cuda", generator=g) + 0.5).bfloat16()
    for n in (1, 16, 300):
        xs, ys = x[:n].contiguous(), y[:n].contiguous()
        w, ids = cuda_moe.route(xs, scale, proj, expert_scale, K, 1e-6)
        w_e, ids_e = cuda_moe.route(xs, _misaligned(scale), proj, expert_scale, K, 1e-6)
        assert torch.equal(ids, ids_e) and torch.equal(w, w_e), n
        w, ids, new = cuda_moe.route(xs, scale, proj, expert_scale, K, 1e-6, residual=(ys, rw))
        w_e, ids_e, new_e = cuda_moe.route(xs, _misaligned(scale), proj, expert_scale, K, 1e-6,
                                           residual=(ys, _misaligned(rw)))
        assert torch.equal(new, new_e) and torch.equal(ids, ids_e) and torch.equal(w, w_e), n


def test_route_ties_pick_lowest_expert_id():
    # Experts share proj rows in groups of ~3 at scattered ids, so their logits tie exactly (the kernel
    # computes every expert's logit with the same arithmetic); top-8 then splits groups.
    n = 301
    x, scale, _, expert_scale = router_inputs(n, seed=21)
    g = torch.Generator(device="cuda").manual_seed(22)
    distinct = 43
    group = torch.empty(E, dtype=torch.long, device="cuda")
    group[torch.randperm(E, device="cuda", generator=g)] = torch.arange(E, device="cuda") % distinct
    base = (torch.randn(distinct, H, device="cuda", generator=g) * H ** -0.5 * 8).bfloat16()
    proj = base[group].contiguous()
    w, ids = cuda_moe.route(x, scale, proj, expert_scale, K, 1e-6)
    w_ref, ids_ref, logits = mref.route(x, scale, proj, expert_scale, K, 1e-6)
    chosen = chosen_mask(ids, E)
    # Every chosen expert's lower-id group mates are chosen too: ties went to the lowest ids.
    ar = torch.arange(E, device="cuda")
    lower_mates = (group[:, None] == group[None, :]) & (ar[None, :] < ar[:, None])  # [e, e']
    skipped = (~chosen).float() @ lower_mates.t().float()  # per (token, e): unchosen lower-id mates
    assert (skipped[chosen] == 0).all(), "a tie was not resolved to the lowest expert id"
    check_routing(w, ids, w_ref, ids_ref, logits)


def test_route_nan_logits_give_valid_experts():
    n = 37
    x, scale, proj, expert_scale = router_inputs(n, seed=31)
    nan_rows = [0, 3, 36]
    x[0, 5] = float("nan")
    x[3] = float("nan")
    x[36, 100] = float("inf")  # rms = inf: inf * 0 is NaN, so the whole row's logits are NaN
    nan_experts = [7, 64, 100, 127]
    proj[nan_experts] = float("nan")
    w, ids = cuda_moe.route(x, scale, proj, expert_scale, K, 1e-6)
    assert ((ids >= 0) & (ids < E)).all(), f"expert id out of range: {ids.min().item()}..{ids.max().item()}"
    # All-NaN rows are uniform: experts 0..K-1, each weighted expert_scale / K.
    lowest = torch.arange(K, dtype=torch.int32, device="cuda").expand(len(nan_rows), K)
    assert torch.equal(ids[nan_rows], lowest)
    torch.testing.assert_close(w[nan_rows], expert_scale[:K].float().expand(len(nan_rows), K) / K,
                               rtol=0, atol=0)
    finite_rows = [r for r in range(n) if r not in nan_rows]
    assert not torch.isin(ids[finite_rows], torch.tensor(nan_experts, device="cuda")).any(), \
        "an expert with NaN logits was preferred to a number"
    w_ref, ids_ref, logits = mref.route(x, scale, proj, expert_scale, K, 1e-6)
    check_routing(w, ids, w_ref, ids_ref, logits)


# -- dispatch plan ---------------------------------------------------------------------------------


def poisoned_plan(ids, experts):
    """The device plan written into outputs filled with POISON_INT beforehand."""
    out = (torch.full((experts + 1,), POISON_INT, dtype=torch.int32, device=ids.device),
           torch.full(ids.shape, POISON_INT, dtype=torch.int32, device=ids.device),
           torch.full((ids.numel(),), POISON_INT, dtype=torch.int32, device=ids.device))
    return cuda_moe.plan(ids, experts, out=out)


def check_plan(plan, ids, experts):
    offsets, row_of, row_expert = plan
    o_ref, r_ref, e_ref = cuda_moe.plan_dispatch(ids, experts)
    assert torch.equal(offsets, o_ref) and torch.equal(row_of, r_ref)
    routed = int(o_ref[-1])
    assert torch.equal(row_expert[:routed], e_ref)
    # Past offsets[E] row_expert is undefined: the kernel must not write there.
    assert (row_expert[routed:] == POISON_INT).all()


@pytest.mark.parametrize("n", TOKEN_COUNTS)
def test_plan_matches_reference_order(n):
    ids, _ = random_routing(n, seed=n, experts_used=E // 2)  # half of the experts get no tokens
    check_plan(poisoned_plan(ids, E), ids, E)


def test_plan_drops_invalid_ids_and_is_deterministic():
    ids, _ = random_routing(300, seed=5)
    ids[3, 2], ids[17, 0], ids[299, 7] = -1, E, 10_000
    first = poisoned_plan(ids, E)
    check_plan(first, ids, E)
    routed = int(first[0][-1])
    assert routed == ids.numel() - 3
    for _ in range(3):
        again = poisoned_plan(ids, E)
        # Only the defined part: row_expert past offsets[E] is never written.
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
        assert torch.equal(first[2][:routed], again[2][:routed])


@pytest.mark.parametrize("n,pad", [(1, 32), (7, 32), (256, 32), (1000, 64), (2048, 128)])
def test_padded_plan_matches_reference(n, pad):
    ids, _ = random_routing(n, seed=n + pad, experts_used=E // 2)
    ids[0, 0] = -1
    offsets, row_of, row_expert, row_src, tile_expert, num_tiles = cuda_moe.plan(ids, E, pad=pad)
    o_ref, r_ref, e_ref, s_ref, t_ref = cuda_moe.plan_dispatch(ids, E, pad=pad)
    total = int(o_ref[-1])
    assert torch.equal(offsets, o_ref) and torch.equal(row_of, r_ref)
    assert torch.equal(row_expert[:total], e_ref) and torch.equal(row_src[:total], s_ref)
    assert int(num_tiles) == total // pad and torch.equal(tile_expert[:total // pad], t_ref)


@pytest.mark.parametrize("pad", [1, 32, 128])
@pytest.mark.parametrize("n", [513, 1024, 4099])
def test_multi_block_plan_equals_the_single_block_plan(pad, n):
    """Large inputs (over 4,096 entries: 513 tokens and up at top-8) are planned on every SM when the kernel has
    scratch: the same rows (4099 tokens: 32,792 entries, 33 chunks, the last one partial)."""
    ids, _ = random_routing(n, seed=pad, experts_used=E - 5)
    ids[7, 3], ids[n - 99, 0] = -1, E
    one = cuda_moe.plan(ids, E, pad=pad)
    many = cuda_moe.plan(ids, E, pad=pad, multi_block=True)
    ref = cuda_moe.plan_dispatch(ids, E, pad=pad)
    total = int(ref[0][-1])
    for got in (one, many):
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        assert torch.equal(got[2][:total], ref[2])
        if pad > 1:
            assert torch.equal(got[3][:total], ref[3]) and torch.equal(got[4][:total // pad], ref[4])
            assert int(got[5]) == total // pad


# -- the MoE layer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", TOKEN_COUNTS)
def test_moe_fp8_matches_references(pipeline, experts, n):
    gate_up, down = experts
    x = tokens(n, seed=100 + n)
    ids, weights = random_routing(n, seed=200 + n)
    check_moe(x, ids, weights, gate_up, down, f"moe_fp8 n={n}")


@pytest.mark.parametrize("n", [1, 2, 7])
def test_moe_fp8_tiny_batches_without_empty_experts(pipeline, experts, n):
    # Few tokens over 8 experts: every expert group is non-empty. Together with the 128-expert cases
    # (most groups empty at 1 or 7 tokens) this separates "few rows" from "empty groups" in a failure.
    gate_up, down = experts
    few = 8
    gu, dn = gate_up[:few], down[:few]
    x = tokens(n, seed=300 + n)
    g = torch.Generator(device="cuda").manual_seed(400 + n)
    ids = torch.rand(n, few, device="cuda", generator=g).argsort(dim=1).int()  # each token: all 8 experts
    weights = torch.softmax(torch.randn(n, few, device="cuda", generator=g), dim=1)
    check_moe(x, ids, weights, gu, dn, f"moe_fp8 n={n}, {few} experts")


def test_moe_fp8_zero_token_experts_and_one_hot_expert(pipeline, experts):
    gate_up, down = experts
    n = 257
    x = tokens(n, seed=7)
    ids, weights = random_routing(n, seed=8, experts_used=K + 3)  # 117 experts idle
    check_moe(x, ids, weights, gate_up, down, "moe_fp8 with 117 idle experts")
    # All tokens on one expert in slot 0 (weight 1), nothing elsewhere: a single 1000-row group.
    n = 1000
    x = tokens(n, seed=9)
    ids = torch.full((n, 1), 77, dtype=torch.int32, device="cuda")
    weights = torch.ones(n, 1, device="cuda")
    check_moe(x, ids, weights, gate_up, down, "moe_fp8 one expert")


def test_moe_fp8_invalid_ids_contribute_nothing(pipeline, experts):
    gate_up, down = experts
    n = 33
    x = tokens(n, seed=41)
    ids, weights = random_routing(n, seed=42)
    ids[0, 0], ids[5, 3], ids[32, 7] = -1, E, 1 << 20
    out = run_moe(x, ids, weights, gate_up, down)
    what = "moe_fp8 with invalid ids"
    assert_matches_quantized_reference(out, quantized_moe_reference(x, ids, weights, gate_up, down), what)
    # The fp32 reference takes only valid ids: an invalid slot becomes expert 0 with weight 0.
    valid = (ids >= 0) & (ids < E)
    ref32 = reference_moe(x, torch.where(valid, ids, 0), weights * valid, gate_up, down)
    assert_fp8_error_vs_fp32(out, ref32, FP32_TOL_TWO_QUANTS, what)


def test_moe_fp8_batch_rows_and_determinism(pipeline, experts):
    gate_up, down = experts
    b, t = 3, 256
    x = tokens(b * t, seed=11).view(b, t, H)
    ids, weights = random_routing(b * t, seed=12)
    flat = x.reshape(-1, H)
    out = check_moe(flat, ids, weights, gate_up, down, "moe_fp8 batch")
    for _ in range(3):
        assert torch.equal(run_moe(flat, ids, weights, gate_up, down), out)
    # Each sequence alone gives the same rows up to the GEMM tile choice (which follows the row count).
    alone = run_moe(x[1].contiguous(), ids[t:2 * t].contiguous(), weights[t:2 * t].contiguous(), gate_up, down)
    assert rel_err(alone, out[t:2 * t]) <= 1e-2


def test_moe_fp8_at_prefill_size(pipeline, experts):
    """32K tokens (a long prompt's encoder chunk): 262,144 routed rows, ~2,048 per expert; no single-CTA serial
    stage in the GEMMs and no 32-bit overflow in the row arithmetic."""
    gate_up, down = experts
    n = 32768
    x = tokens(n, seed=51)
    ids, weights = random_routing(n, seed=52)
    out = cuda_moe.moe_fp8(x, ids, weights, gate_up, down)
    torch.cuda.synchronize()
    what = f"moe_fp8 n={n} ({pipeline})"
    assert_matches_quantized_reference(out, quantized_moe_reference(x, ids, weights, gate_up, down), what)


def test_moe_fp8_fuses_the_pre_moe_norm_exactly(pipeline, experts):
    """moe_fp8(x, norm=w) equals moe_fp8(rms_norm(x) * w) bit for bit (the gather normalises with the norm kernel's
    arithmetic), and the CUDA ops' norm_moe takes that path."""
    from dgemma.ops import cuda
    from dgemma.ops.cuda import CudaOps

    gate_up, down = experts
    n = 300
    x = (tokens(n, seed=61) * 4).contiguous()
    w = (torch.rand(H, device="cuda", generator=torch.Generator(device="cuda").manual_seed(62)) + 0.5).bfloat16()
    ids, weights = random_routing(n, seed=63)
    fused = cuda_moe.moe_fp8(x, ids, weights, gate_up, down, norm=w, eps=1e-6).clone()
    plain = cuda_moe.moe_fp8(cuda.rms_norm(x, w, 1e-6), ids, weights, gate_up, down)
    assert torch.equal(fused, plain)
    assert torch.equal(CudaOps().norm_moe(x, w, 1e-6, ids, weights, gate_up, down), plain)


DENSE_I = 3 * I  # the model's dense MLP: 2112 = 3 expert intermediates


@pytest.fixture(scope="module")
def shared_layer(experts):
    """A layer whose dense MLP (intermediate 3 * I) is laid out as 3 shared experts after the 128 routed ones
    (share_dense_mlp), with the dense weights it came from."""
    from types import SimpleNamespace

    g = torch.Generator(device="cuda").manual_seed(70)
    gate = quantize_weight((torch.randn(DENSE_I, H, device="cuda", generator=g) * H ** -0.5).bfloat16())
    up = quantize_weight((torch.randn(DENSE_I, H, device="cuda", generator=g) * H ** -0.5).bfloat16())
    down = quantize_weight((torch.randn(H, DENSE_I, device="cuda", generator=g) * DENSE_I ** -0.5).bfloat16())
    gate_up, dn = experts
    layer = SimpleNamespace(mlp_gate=gate, mlp_up=up, mlp_down=down, experts_gate_up=gate_up, experts_down=dn,
                            shared_experts=None)
    assert cuda_moe.share_dense_mlp(layer)
    return layer, (gate, up, down)


@pytest.mark.parametrize("n", [1, 7, 256, 1000])
@pytest.mark.parametrize("normed", [False, True])
def test_contiguous_pipeline_runs_the_dense_ffn_as_shared_experts(shared_layer, n, normed):
    """moe_fp8(shared=3) over the stacked weights: the routed sum and the shared experts' sum each match the
    FP8-faithful reference (same quantisation points), and the shared sum is the dense MLP (within FP8 error of the
    fp32 MLP on the dequantised weights; its intermediate is quantised per piece, not per token)."""
    layer, (gate, up, down) = shared_layer
    sh = layer.shared_experts
    x = (tokens(n, seed=71) * 3).contiguous()
    ids, weights = random_routing(n, seed=72)
    g = torch.Generator(device="cuda").manual_seed(73)
    norm = (torch.rand(H, device="cuda", generator=g) + 0.5).bfloat16() if normed else None
    mlp_norm = (torch.rand(H, device="cuda", generator=g) + 0.5).bfloat16() if normed else None
    kw = dict(norm=norm, shared_norm=mlp_norm, eps=1e-6) if normed else {}
    cuda_moe.moe_fp8(x, ids, weights, sh.stack_gate_up, sh.stack_down, shared=sh.shared, **kw)
    poison_workspaces()
    out, mlp = nan_like((n, H)), nan_like((n, H))
    got = cuda_moe.moe_fp8(x, ids, weights, sh.stack_gate_up, sh.stack_down, out=out, shared=sh.shared,
                           shared_out=mlp, **kw)
    torch.cuda.synchronize()
    assert got[0] is out and got[1] is mlp
    ref_out, ref_mlp = mref.moe_fp8_shared(x, ids, weights, sh.stack_gate_up, sh.stack_down, sh.shared, norm, mlp_norm)
    assert_matches_quantized_reference(out, ref_out, f"shared pipeline, routed sum, n={n}")
    assert_matches_quantized_reference(mlp, ref_mlp, f"shared pipeline, shared sum, n={n}")
    ops = ReferenceOps()
    xr = x.float() if norm is None else ops.rms_norm(x, norm, 1e-6).float()
    xm = x.float() if norm is None else ops.rms_norm(x, mlp_norm, 1e-6).float()
    assert_fp8_error_vs_fp32(out, reference_moe(xr, ids, weights, layer.experts_gate_up, layer.experts_down),
                             FP32_TOL_TWO_QUANTS, "routed sum vs fp32")
    assert_fp8_error_vs_fp32(mlp, ops.gated_mlp(xm, gate, up, down), FP32_TOL_TWO_QUANTS, "dense MLP vs fp32")


@pytest.mark.parametrize("n", [1, 7, 256])
def test_contiguous_pipeline_rows_feed_the_residual_kernel_exactly(shared_layer, n):
    """moe_fp8(combine=False) leaves the rows unsummed; ExpertRows.tensors() and the residual kernel that sums them
    itself (ffn_residual_experts, with and without the next GEMM's FP8 input) give exactly the combine's branches and
    the two-launch residual; a later moe_fp8 on the stream invalidates the rows (refused, not read stale)."""
    from dgemma.ops import cuda

    layer, _ = shared_layer
    sh = layer.shared_experts
    g = torch.Generator(device="cuda").manual_seed(80 + n)
    x = (torch.randn(n, H, device="cuda", generator=g) * 3).bfloat16()
    ids, weights = random_routing(n, seed=81)
    w = [(torch.rand(H, device="cuda", generator=g) + 0.5).bfloat16() for _ in range(5)]
    scalar = torch.tensor([0.7], device="cuda").bfloat16()
    kw = dict(norm=w[0], shared_norm=w[1], eps=1e-6, shared=sh.shared)
    moe, mlp = (t.clone() for t in cuda_moe.moe_fp8(x, ids, weights, sh.stack_gate_up, sh.stack_down, **kw))
    resid = torch.randn(n, H, device="cuda", generator=g).bfloat16()
    plain = cuda.residual_norm(resid, mlp, w[2], 1e-6, moe, w[3], w[4], scalar)
    plain_q = cuda.residual_norm_fp8(resid, mlp, w[2], 1e-6, w[0], moe, w[3], w[4], scalar)
    rows = cuda_moe.moe_fp8(x, ids, weights, sh.stack_gate_up, sh.stack_down, combine=False, **kw)
    assert isinstance(rows, cuda_moe.ExpertRows)
    mlp_t, moe_t = rows.tensors()
    assert torch.equal(mlp_t, mlp) and torch.equal(moe_t, moe)
    assert torch.equal(cuda.ffn_residual_experts(resid, rows, w[2], w[3], w[4], scalar, 1e-6), plain)
    fused, q = cuda.ffn_residual_experts(resid, rows, w[2], w[3], w[4], scalar, 1e-6, w[0])
    assert torch.equal(fused, plain_q[0])
    assert torch.equal(q.q.view(torch.uint8), plain_q[1].q.view(torch.uint8)) and torch.equal(q.scale, plain_q[1].scale)
    cuda_moe.moe_fp8(x, ids, weights, sh.stack_gate_up, sh.stack_down, **kw)
    with pytest.raises(RuntimeError, match="overwritten by a later moe_fp8"):
        cuda.ffn_residual_experts(resid, rows, w[2], w[3], w[4], scalar, 1e-6)


RESIDUAL_PROBE = r"""
import sys, torch
from dgemma import _ext
lib = _ext.require_cuda()
g = torch.Generator(device="cuda").manual_seed(17)
out = {}
for rows, dim, slots, top_k in ((1, 2816, 11, 8), (7, 2816, 11, 8), (256, 2816, 11, 8), (333, 1000, 5, 3),
                                (3, 3072, 12, 9)):
    down = (torch.randn(rows * slots + 5, dim, device="cuda", generator=g) * 2).bfloat16()
    row_of = torch.randperm(rows * slots + 5, device="cuda", generator=g)[: rows * slots].view(rows, slots)
    row_of = row_of.int().masked_fill(torch.rand(rows, slots, device="cuda", generator=g) < 0.1, -1)  # dropped slots
    x = (torch.randn(rows, dim, device="cuda", generator=g) * 3).bfloat16()
    w = [(torch.rand(dim, device="cuda", generator=g) + 0.5).bfloat16() for _ in range(4)]
    scalar = torch.tensor([0.7], device="cuda").bfloat16()
    res = torch.empty_like(x)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        lib.ffn_residual_experts(x, down, row_of, top_k, w[0], w[1], w[2], scalar, res, 1e-6,
                                 _ext.current_stream(x.device))
        torch.cuda.synchronize()
    kernels = sorted({e.name for e in prof.events() if "residual" in e.name})
    res_q = torch.empty_like(x)
    q = torch.empty(rows, dim, dtype=torch.float8_e4m3fn, device="cuda")
    scale = torch.empty(rows, dtype=torch.float32, device="cuda")
    lib.ffn_residual_experts(x, down, row_of, top_k, w[0], w[1], w[2], scalar, res_q, 1e-6,
                             _ext.current_stream(x.device), w[3], q, scale)
    # Bit patterns (torch.equal takes -0 for +0).
    out[f"{rows}x{dim}"] = (res.view(torch.int16).cpu(), res_q.view(torch.int16).cpu(), q.view(torch.uint8).cpu(),
                            scale.view(torch.int32).cpu(), kernels)
torch.save(out, sys.argv[1])
"""


def test_the_block_and_warp_residual_kernels_give_the_same_bits(tmp_path):
    """DGEMMA_RESIDUAL_KERNEL (read once per process): "block" (the default) spreads a row's elementwise passes over a
    block and sums on one warp in the per-warp kernel's order, "warp" is the per-warp kernel: the same output, FP8 codes
    and scales bit for bit (1 to 333 rows, hidden 1000 to 3072, dropped slots). An unknown name is refused."""
    import os
    import subprocess
    import sys

    outs = {}
    for name in ("block", "warp"):
        r = subprocess.run([sys.executable, "-c", RESIDUAL_PROBE, str(tmp_path / f"{name}.pt")], capture_output=True,
                           text=True, env=dict(os.environ, DGEMMA_RESIDUAL_KERNEL=name), timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[name] = torch.load(tmp_path / f"{name}.pt")
    for key, block in outs["block"].items():
        warp = outs["warp"][key]
        # Each run took its own kernel (the setting was not ignored).
        assert any("residual_branches_row_kernel" in k for k in block[4]), (key, block[4])
        assert not any("residual_branches_row_kernel" in k for k in warp[4]), (key, warp[4])
        assert any("residual_norm_kernel" in k for k in warp[4]), (key, warp[4])
        assert all(torch.equal(a, b) for a, b in zip(block[:4], warp[:4])), key
        assert torch.isfinite(block[0].view(torch.bfloat16).float()).all(), key
    r = subprocess.run([sys.executable, "-c", RESIDUAL_PROBE, str(tmp_path / "x.pt")], capture_output=True, text=True,
                       env=dict(os.environ, DGEMMA_RESIDUAL_KERNEL="grid"), timeout=300)
    assert r.returncode != 0 and "DGEMMA_RESIDUAL_KERNEL=grid is not a residual kernel (block or warp)" in r.stderr


def test_moe_fp8_validates_arguments(experts):
    gate_up, down = experts
    x = tokens(4, seed=1)
    ids, weights = random_routing(4, seed=2)
    with pytest.raises(ValueError, match="x has dtype float32, expected bfloat16"):
        cuda_moe.moe_fp8(x.float(), ids, weights, gate_up, down)
    with pytest.raises(ValueError, match="gate_up.q"):
        cuda_moe.moe_fp8(x, ids, weights, Fp8Weight(gate_up.q[:, :, :-16], gate_up.scale), down)
    with pytest.raises(ValueError, match="weights"):
        cuda_moe.moe_fp8(x, ids, weights[:3], gate_up, down)


# -- dense FP8 linear and gated MLP ----------------------------------------------------------------

LINEAR_SHAPES = [(4096, 2816), (2048, 2816), (2816, 4096), (8192, 2816), (1024, 2816), (2816, 8192)]


@pytest.mark.parametrize("n_out,k", LINEAR_SHAPES)
@pytest.mark.parametrize("rows", [1, 7, 256, 1000])
def test_linear_fp8_matches_references(rows, n_out, k):
    g = torch.Generator(device="cuda").manual_seed(rows * 7 + n_out)
    w = quantize_weight((torch.randn(n_out, k, device="cuda", generator=g) * k ** -0.5).bfloat16())
    x = torch.randn(rows, k, device="cuda", generator=g).bfloat16()
    cuda_moe.linear_fp8(x, w)
    poison_workspaces()
    out = nan_like((rows, n_out))
    cuda_moe.linear_fp8(x, w, out=out)
    what = f"linear_fp8 rows={rows} n={n_out} k={k}"
    assert_matches_quantized_reference(out, mref.linear_fp8(x, w), what, requantised=False)
    assert_fp8_error_vs_fp32(out, x.float() @ w.dequantize().t(), FP32_TOL_ONE_QUANT, what)


@pytest.mark.parametrize("rows", [1, 7, 256, 1000])
def test_gated_mlp_fp8_matches_references(rows):
    inter = 2112
    g = torch.Generator(device="cuda").manual_seed(rows)
    gate, up = (quantize_weight((torch.randn(inter, H, device="cuda", generator=g) * H ** -0.5).bfloat16())
                for _ in range(2))
    down = quantize_weight((torch.randn(H, inter, device="cuda", generator=g) * inter ** -0.5).bfloat16())
    x = torch.randn(2, rows, H, device="cuda", generator=g).bfloat16()
    cuda_moe.gated_mlp_fp8(x, gate, up, down)
    poison_workspaces()
    out = nan_like((2, rows, H))
    cuda_moe.gated_mlp_fp8(x, gate, up, down, out=out)
    what = f"gated_mlp_fp8 rows=2x{rows}"
    assert_matches_quantized_reference(out, mref.gated_mlp_fp8(x, gate, up, down), what)
    assert_fp8_error_vs_fp32(out, ReferenceOps().gated_mlp(x.float(), gate, up, down), FP32_TOL_TWO_QUANTS, what)


def test_linear_fp8_validates_arguments():
    w = quantize_weight(torch.randn(64, 128, device="cuda").bfloat16())
    with pytest.raises(ValueError, match="input features"):
        cuda_moe.linear_fp8(torch.randn(3, 96, device="cuda").bfloat16(), w)
    with pytest.raises(ValueError, match="bfloat16"):
        cuda_moe.linear_fp8(torch.randn(3, 128, device="cuda"), w)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A float tensor's bit patterns (torch.equal takes -0 for +0); other tensors as they are."""
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    return t.view(ints[t.dtype]) if t.dtype in ints else t


ROUTE_PROBE = """
import sys, torch
from dgemma.ops import cuda_moe
g = torch.Generator(device="cuda").manual_seed(3)
n, h, e = 777, 2816, 128
x = torch.randn(n, h, device="cuda", generator=g).to(torch.bfloat16)
scale = (1 + 0.1 * torch.randn(h, device="cuda", generator=g)).to(torch.bfloat16)
proj = (torch.randn(e, h, device="cuda", generator=g) * h ** -0.5).to(torch.bfloat16)
expert_scale = (1 + 0.1 * torch.randn(e, device="cuda", generator=g)).to(torch.bfloat16)
w, ids = cuda_moe.route(x, scale, proj, expert_scale, 8, 1e-6)
y = torch.randn(n, h, device="cuda", generator=g).to(torch.bfloat16)
rw = (torch.rand(h, device="cuda", generator=g) + 0.5).to(torch.bfloat16)
fused = cuda_moe.route(x, scale, proj, expert_scale, 8, 1e-6, residual=(y, rw))
torch.save((w.cpu(), ids.cpu(), *(t.cpu() for t in fused)), sys.argv[1])
"""


def test_every_router_tile_routes_identically(tmp_path):
    """The CUDA-core tiles (DGEMMA_ROUTE_TILE, read once per process) change only the launch shape: the same weights
    and ids bit for bit, at a token count no tile divides, with and without the fused residual. The tensor-core router
    (the default, "tc") sums each logit in another order: the same experts but for near-ties, weights within float
    rounding; its launch shapes ("tc_cluster": every block's K chunks over a cluster of 8, here 49 clusters in several
    waves, each rank summing and selecting two tokens; "tc_single": one block per 16 tokens) give the same bits as
    "tc". An unknown tile is refused by name."""
    import os
    import subprocess
    import sys

    outs = {}
    for tile in ("tc", "tc_cluster", "tc_single", "4x8", "8x8", "2x8", "1x8"):
        path = tmp_path / f"{tile}.pt"
        r = subprocess.run([sys.executable, "-c", ROUTE_PROBE, str(path)], capture_output=True, text=True,
                           env=dict(os.environ, DGEMMA_ROUTE_TILE=tile), timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        outs[tile] = torch.load(path)
    tc = outs.pop("tc")
    for tile in ("tc_cluster", "tc_single"):
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(outs.pop(tile), tc)), tile
    for tile, got in outs.items():
        assert all(torch.equal(a, b) for a, b in zip(got, outs["4x8"])), tile
    assert torch.equal(tc[4], outs["4x8"][4])  # the fused residual rows: the same arithmetic in every kernel
    same = (tc[1] == outs["4x8"][1]).all(dim=1)
    assert same.float().mean() >= 0.98, f"tensor-core router: {int((~same).sum())} of 777 tokens routed differently"
    torch.testing.assert_close(tc[0][same], outs["4x8"][0][same], rtol=1e-5, atol=1e-6)
    r = subprocess.run([sys.executable, "-c", ROUTE_PROBE, str(tmp_path / "x.pt")], capture_output=True, text=True,
                       env=dict(os.environ, DGEMMA_ROUTE_TILE="3x3"), timeout=300)
    names = "tc, 4x8, 8x8, 2x8, 1x8, tc_cluster, tc_single"
    assert r.returncode != 0 and f"DGEMMA_ROUTE_TILE=3x3 is not a compiled router tile ({names})" in r.stderr


DENSE_CLUSTER_PROBE = r"""
import sys
import torch
from dgemma.ops import cuda_moe
from dgemma.quant import quantize_weight
out = {}
g = torch.Generator(device="cuda").manual_seed(11)
for rows in (int(r) for r in sys.argv[2].split(",")):
    for n_out, k in ((8192, 2816), (2816, 4096), (136, 64)):
        x = (torch.randn(rows, k, device="cuda", generator=g) * 2).bfloat16()
        w = quantize_weight((torch.randn(n_out, k, device="cuda", generator=g) * k ** -0.5).bfloat16())
        out[f"linear.{rows}.{n_out}.{k}"] = cuda_moe.linear_fp8(x, w).cpu()
    x = torch.randn(rows, 2816, device="cuda", generator=g).bfloat16()
    gate, up, down = (quantize_weight((torch.randn(*s, device="cuda", generator=g) * s[1] ** -0.5).bfloat16())
                      for s in ((2112, 2816), (2112, 2816), (2816, 2112)))
    out[f"mlp.{rows}"] = cuda_moe.gated_mlp_fp8(x, gate, up, down).cpu()
torch.save(out, sys.argv[1])
"""


def _dense_cluster_probe(path, setting, rows="65,256,333,1024", variable="DGEMMA_DENSE_CLUSTER"):
    import os
    import subprocess
    import sys

    env = dict(os.environ, **{variable: setting})
    return subprocess.run([sys.executable, "-c", DENSE_CLUSTER_PROBE, str(path), rows], capture_output=True,
                          text=True, env=env, timeout=300)


def test_dense_gemm_clusters_give_the_same_bits(tmp_path):
    """DGEMMA_DENSE_CLUSTER=2x2 (read once per process) runs the dense FP8 GEMMs in 2 x 2 clusters whose CTAs share
    each operand tile by TMA multicast: every tile is multiplied exactly as without clusters, so every output is the
    same bit for bit (ragged tiles both ways: 65 and 333 rows, 136 output channels; the gated MLP's three GEMMs)."""
    outs = {}
    for setting in ("off", "2x2"):
        r = _dense_cluster_probe(tmp_path / f"{setting}.pt", setting)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[setting] = torch.load(tmp_path / f"{setting}.pt")
    assert outs["off"].keys() == outs["2x2"].keys()
    for key, plain in outs["off"].items():
        assert torch.equal(plain, outs["2x2"][key]), key


def test_stream_k_dense_gemms_agree_with_the_persistent_ones_and_repeat_exactly(tmp_path):
    """DGEMMA_DENSE_SCHEDULE=streamk (read once per process) runs the dense FP8 GEMMs on CUTLASS's stream-K scheduler:
    where tiles are fewer than SMs their K loops are shared out and the partial sums reduced in a fixed order, so the
    outputs differ from the persistent kernel's only by the summation order and are the same bits run after run (every
    tile width: 7 to 1024 rows). One GEMM: within the FP8-faithful bound of one GEMM (QUANT_REL_TOL). The gated MLP
    re-quantises its intermediate per row, so an ulp flip in a row's largest gelu·up value moves that row's E4M3 scale
    and re-rounds the whole row: the re-quantised bound (QUANT_REL_TOL_REQUANTISED; an H200 measured 1.3e-2 at 7
    rows, where one row is a seventh of the norm)."""
    rows = "7,65,256,333,1024"
    outs = {}
    for name, setting in (("persistent", "persistent"), ("streamk", "streamk"), ("again", "streamk")):
        r = _dense_cluster_probe(tmp_path / f"{name}.pt", setting, rows, variable="DGEMMA_DENSE_SCHEDULE")
        assert r.returncode == 0, r.stderr[-3000:]
        outs[name] = torch.load(tmp_path / f"{name}.pt")
    assert outs["persistent"].keys() == outs["streamk"].keys()
    over = []
    for key, plain in outs["persistent"].items():
        sk = outs["streamk"][key]
        assert torch.equal(sk, outs["again"][key]), key
        rel = ((sk.float() - plain.float()).norm() / plain.float().norm().clamp_min(1e-30)).item()
        if rel > (QUANT_REL_TOL_REQUANTISED if key.startswith("mlp.") else QUANT_REL_TOL):
            over.append((key, rel))
    assert not over, over


def test_an_unknown_dense_schedule_is_refused_by_name(tmp_path):
    r = _dense_cluster_probe(tmp_path / "x.pt", "splitk", "7", variable="DGEMMA_DENSE_SCHEDULE")
    assert r.returncode != 0
    assert "DGEMMA_DENSE_SCHEDULE=splitk is not a dense GEMM schedule (persistent or streamk)" in r.stderr


@pytest.mark.parametrize("rows", ["65", "7"])  # 7: the 32-token tile, never clustered, refuses it all the same
def test_an_unknown_dense_cluster_is_refused_by_name(tmp_path, rows):
    r = _dense_cluster_probe(tmp_path / "x.pt", "4x4", rows)
    assert r.returncode != 0
    assert "DGEMMA_DENSE_CLUSTER=4x4 is not a dense GEMM cluster (off or 2x2)" in r.stderr
