"""The compiled extension: its capability queries, launcher validation and (on a GPU) the RMSNorm kernel."""

import pytest
import torch

import dgemma
from dgemma import _ext
from dgemma.ops.reference import ReferenceOps


def test_extension_imports_and_reports():
    lib = _ext.extension()
    assert lib.version() == dgemma.__version__
    assert isinstance(lib.built_with_cuda(), bool)
    assert (lib.cuda_runtime_version() > 0) == lib.built_with_cuda()


def test_launcher_rejects_host_tensors():
    lib = _ext.extension()
    if not lib.built_with_cuda():
        pytest.skip("extension built without CUDA")
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="x must be a CUDA tensor, got a CPU tensor"):
        lib.rms_norm(x, None, x, 1e-6, 0)
    with pytest.raises(ValueError, match="x must be a torch.Tensor"):
        lib.rms_norm([1.0], None, x, 1e-6, 0)


def test_vocab_head_limits_come_from_the_extension():
    """The engine asks the extension whether the fused head runs a model's sizes (no limits restated in Python)."""
    lib = _ext.extension()
    if not lib.built_with_cuda():
        with pytest.raises(RuntimeError, match="built without CUDA"):
            lib.vocab_head_unsupported(1, 256, 262144, 2816)
        return
    assert lib.vocab_head_unsupported(1, 256, 262144, 2816) == ""
    assert "canvas length 2000 must be in [1, " in lib.vocab_head_unsupported(1, 2000, 262144, 2816)
    assert "hidden size 100 must be a positive multiple of" in lib.vocab_head_unsupported(1, 256, 512, 100)
    assert "vocab size 0" in lib.vocab_head_unsupported(1, 256, 0, 2816)


def test_attention_and_router_limits_come_from_the_extension():
    """Host-only queries, in every build: the CUDA ops ask them instead of restating the kernels' limits."""
    lib = _ext.extension()
    assert lib.attention_head_dim_supported(256) and lib.attention_head_dim_supported(512)
    assert not any(lib.attention_head_dim_supported(d) for d in (0, -1, 64, 128, 255, 1024, 2**40))
    assert lib.moe_route_unsupported(128, 8, 2816) == ""  # 26B-A4B
    assert lib.moe_route_unsupported(256, 16, 64) == ""
    assert "100 experts: expected a multiple of 32 up to 256" in lib.moe_route_unsupported(100, 8, 2816)
    assert "512 experts" in lib.moe_route_unsupported(512, 8, 2816)
    assert "top_k 17: expected 1..16" in lib.moe_route_unsupported(128, 17, 2816)
    assert "top_k 0" in lib.moe_route_unsupported(32, 0, 64)
    assert "hidden size 100: expected a positive multiple of 8" in lib.moe_route_unsupported(128, 8, 100)
    assert "too large for the router's shared memory" in lib.moe_route_unsupported(128, 8, 16384)
    # The dispatch plan's: shared experts (26B-A4B's dense MLP is 3 expert-sized pieces) and the multi-block scratch.
    assert lib.moe_shared_experts_unsupported(131, 3) == ""
    assert lib.moe_shared_experts_unsupported(256, 16) == ""
    assert "257 experts: expected 1..256" in lib.moe_shared_experts_unsupported(257, 1)
    assert "shared 17: expected at most 16" in lib.moe_shared_experts_unsupported(200, 17)
    assert "shared 4: expected 0..3 (at least one expert must be routed)" in lib.moe_shared_experts_unsupported(4, 4)
    assert lib.moe_plan_scratch_ints(2048, 128) == 2 * 128 and lib.moe_plan_scratch_ints(2049, 128) == 3 * 128
    assert lib.moe_plan_scratch_ints(0, 128) == 0


def test_cuda_status_names_the_reason():
    reason = _ext.cuda_status()
    if reason is not None:
        with pytest.raises(dgemma.BackendUnavailableError, match="the CUDA backend is unavailable: "):
            _ext.require_cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,dim", [(1, 1), (7, 19), (111, 256), (989, 512), (300, 2816), (5, 4097)])
@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm_kernel_matches_reference(dtype, rows, dim, weighted):
    from dgemma.ops.cuda import rms_norm

    g = torch.Generator(device="cuda").manual_seed(rows * dim)
    x = torch.randn(rows, dim, device="cuda", generator=g).to(dtype) * 3
    w = (torch.rand(dim, device="cuda", generator=g) + 0.5).to(dtype) if weighted else None
    out = torch.full_like(x, float("nan"))  # poisoned
    rms_norm(x, w, 1e-6, out=out)
    ref = ReferenceOps().rms_norm(x.float(), None if w is None else w.float(), 1e-6)
    same_precision = ReferenceOps().rms_norm(x, w, 1e-6)
    err = (out.float() - ref).abs().max().item()
    bound = max(2 * (same_precision.float() - ref).abs().max().item(), 1e-5)
    assert torch.isfinite(out).all()
    assert err <= bound, f"error {err:.3e} exceeds {bound:.3e}"


@pytest.mark.gpu
def test_rms_norm_kernel_strided_rows_and_heads():
    from dgemma.ops.cuda import rms_norm

    x = torch.randn(4, 9, 6, 32, device="cuda", dtype=torch.bfloat16)[:, :, 1:5]  # strided head slice
    w = torch.rand(32, device="cuda", dtype=torch.bfloat16) + 0.5
    with pytest.raises(ValueError, match="uniformly strided rows"):
        rms_norm(x, w, 1e-6, out=torch.empty(4, 9, 4, 32, device="cuda", dtype=torch.bfloat16))
    y = x.reshape(-1, 6 * 32)[:, 32:160]  # evenly strided rows of 128
    out = rms_norm(y, None, 1e-6)
    torch.testing.assert_close(out, ReferenceOps().rms_norm(y, None, 1e-6), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match=r"weight has shape \[32\], expected size 128"):
        rms_norm(y, w, 1e-6)
