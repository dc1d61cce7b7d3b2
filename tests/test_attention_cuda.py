"""GPU tests of the attention kernels against the fp32 reference (ReferenceOps.attention).

The kernel's max error must be at most 2x that of the same reference run in bf16 (a same-precision
PyTorch implementation), and its max error relative to the largest output at most 2e-2.
"""

import math

import pytest
import torch

from dgemma.config import FULL, SLIDING, LayerSpec, RopeSpec
from dgemma.ops.reference import ReferenceOps
from dgemma.rope import cos_sin, inverse_frequencies

pytestmark = pytest.mark.gpu

REF = ReferenceOps()
BF16 = torch.bfloat16
SLIDING_SHAPE = dict(d=256, hq=16, hkv=8, window=1024)
FULL_SHAPE = dict(d=512, hq=16, hkv=2, window=None)
IMPLS = ("mma_sync", "wgmma", "wgmma_deep")


def _randn(gen, *shape, scale=1.0):
    return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(BF16)


class Cache:
    """A layer cache filled like KVCache.write from a random K/V history per sequence; slots that
    hold no position are NaN, so a kernel reading them fails the test."""

    def __init__(self, gen, lens, hkv, d, ring, extra_slots=3):
        self.lens, self.ring = list(lens), ring
        slots = ring if ring else max(lens) + extra_slots
        self.k = torch.full((len(lens), hkv, slots, d), float("nan"), dtype=BF16, device="cuda")
        self.v = torch.full_like(self.k, float("nan"))
        self.hist = []
        for b, length in enumerate(lens):
            hk, hv = _randn(gen, hkv, length, d), _randn(gen, hkv, length, d)
            keep = min(length, ring) if ring else length
            pos = torch.arange(length - keep, length, device="cuda")
            slot = pos % ring if ring else pos
            self.k[b][:, slot], self.v[b][:, slot] = hk[:, length - keep:], hv[:, length - keep:]
            self.hist.append((hk, hv))


def _reference(q, keys, values, mask, dtype):
    """ReferenceOps.attention of one sequence: q [Hq, T, D], keys/values [Hkv, K, D], mask [T, K]."""
    m = None if mask is None else mask[None]
    return REF.attention(q[None].to(dtype), keys[None].to(dtype), values[None].to(dtype), m)[0].float()


def _check(out, ref32, ref16, rows=None):
    """out/ref [T, Hq, D]; rows: bool [T] of rows that see at least one key (others must be 0)."""
    out = out.float()
    assert torch.isfinite(out).all(), "non-finite output"
    if rows is not None:
        assert (out[~rows] == 0).all(), "rows without keys must be 0"
        out, ref32, ref16 = out[rows], ref32[rows], ref16[rows]
    if out.numel() == 0:
        return 0.0
    diff = (out - ref32).abs()
    err = diff.max().item()
    base = (ref16 - ref32).abs().max().item()
    rel = err / ref32.abs().max().item()
    assert err <= 2 * base and rel <= 2e-2, (
        f"max error {err:.3e} (relative {rel:.3e}) vs the bf16 reference's {base:.3e}; {_where(diff, 2 * base)}")
    return rel


def _where(diff, tol):
    """Where the errors above ``tol`` are, in [token, head, dim] terms (to tell a layout bug from a numeric one)."""
    bad = diff > tol
    idx = [int(i) for i in torch.nonzero(diff == diff.max())[0]] if diff.dim() == 3 else []
    per = [int(bad.any(dim=tuple(j for j in range(bad.dim()) if j != k)).sum()) for k in range(bad.dim())]
    return (f"worst at [token, head, dim] {idx}; {int(bad.sum())} of {bad.numel()} elements off, spanning "
            f"{per} distinct [tokens, heads, dims]")


def _decoder_case(seed, shape, lens, canvas, ring, *, valid=None, num_splits=None, max_prefix=None, lens_arg=None,
                  impl=None):
    from dgemma.ops.cuda_attention import decoder_attention

    gen = torch.Generator(device="cuda").manual_seed(seed)
    b, d, hq, hkv, window = len(lens), shape["d"], shape["hq"], shape["hkv"], shape["window"]
    cache = Cache(gen, lens, hkv, d, ring)
    # Projection-like layouts: [B, C, H, D] viewed as [B, H, C, D].
    q = _randn(gen, b, canvas, hq, d, scale=1.5 / math.sqrt(d)).transpose(1, 2)
    ck = _randn(gen, b, canvas, hkv, d).transpose(1, 2)
    cv = _randn(gen, b, canvas, hkv, d).transpose(1, 2)
    out = torch.full((b, canvas, hq, d), float("nan"), dtype=BF16, device="cuda")
    got = decoder_attention(q, cache.k, cache.v, ck, cv, lens if lens_arg is None else lens_arg, ring, window,
                            valid=valid, out=out, num_splits=num_splits, max_prefix=max_prefix, impl=impl)
    assert got.data_ptr() == out.data_ptr()
    for i, length in enumerate(lens):
        first = length - (min(length, window - 1) if window else length)
        hk, hv = cache.hist[i]
        keys = torch.cat((hk[:, first:], ck[i]), dim=1)
        values = torch.cat((hv[:, first:], cv[i]), dim=1)
        mask = None
        if valid is not None:
            kv = torch.cat((valid[i, first:length], torch.ones(canvas, dtype=torch.bool, device="cuda")))
            mask = kv[None].expand(canvas, -1)
        _check(out[i], _reference(q[i], keys, values, mask, torch.float32), _reference(q[i], keys, values, mask, BF16))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("length", [0, 1, 1022, 1023, 1024, 1025, 5000])
def test_decoder_sliding(length, impl):
    _decoder_case(length, SLIDING_SHAPE, [length], 256, 1023, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("length", [1025, 5000])
def test_decoder_sliding_rollback_ring(length, impl):
    _decoder_case(7 + length, SLIDING_SHAPE, [length], 256, 1023 + 37, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hq,hkv", [(6, 2), (4, 4), (16, 2), (10, 5)])
@pytest.mark.parametrize("canvas", [256, 77, 1])
def test_decoder_head_groups(hq, hkv, canvas, impl):
    """Groups of 3, 1, 8 and 2 query heads per KV head: the wgmma kernel's tiles of head-minor packed rows then start
    mid-group and mid-token, and its last tile is partly past the queries."""
    shape = dict(d=256, hq=hq, hkv=hkv, window=1024)
    _decoder_case(hq * 100 + canvas, shape, [1100, 0, 300], canvas, 1023, impl=impl)
    _decoder_case(hq * 100 + canvas + 1, shape, [1100, 0, 300], canvas, 1023, impl=impl, num_splits=3)
    full = dict(d=512, hq=hq, hkv=hkv, window=None)
    _decoder_case(hq * 100 + canvas + 2, full, [700, 0, 33], canvas, 0, impl=impl, num_splits=2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("length", [0, 1, 1022, 1023, 1024, 1025, 5000, 70000])
def test_decoder_full(length, impl):
    _decoder_case(100 + length, FULL_SHAPE, [length], 256, 0, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_decoder_ragged_batch(num_splits, impl):
    _decoder_case(11, SLIDING_SHAPE, [1025, 0, 5000, 17], 77, 1023, num_splits=num_splits, impl=impl)
    _decoder_case(12, FULL_SHAPE, [1, 1023, 5000], 77, 0, num_splits=num_splits, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,ring", [(SLIDING_SHAPE, 1023), (FULL_SHAPE, 0)])
def test_split_kv_combines_in_the_kernel_and_leaves_its_counters_zero(shape, ring, impl):
    """The last split of each query tile combines the partials: the same output on every call (the arrival counters
    are reset by the kernel; a counter left behind would skip or repeat a combine), close to the unsplit kernel, and
    every counter zero afterwards."""
    from dgemma.ops import cuda_attention
    from dgemma.ops.cuda_attention import decoder_attention

    gen = torch.Generator(device="cuda").manual_seed(21)
    lens, canvas = [3000, 700, 1], 100
    b, d, hq, hkv = len(lens), shape["d"], shape["hq"], shape["hkv"]
    cache = Cache(gen, lens, hkv, d, ring)
    q = _randn(gen, b, canvas, hq, d, scale=1.5 / math.sqrt(d)).transpose(1, 2)
    ck = _randn(gen, b, canvas, hkv, d).transpose(1, 2)
    cv = _randn(gen, b, canvas, hkv, d).transpose(1, 2)

    def run(splits):
        return decoder_attention(q, cache.k, cache.v, ck, cv, lens, ring, shape["window"], num_splits=splits,
                                 impl=impl).clone()

    whole = run(1)
    outs = [run(5) for _ in range(4)]
    torch.cuda.synchronize()
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    rel = ((outs[0].float() - whole.float()).abs().max() / whole.float().abs().max()).item()
    assert rel <= 1e-2, rel
    for counters in cuda_attention._COUNTERS.values():
        assert int(counters.abs().sum()) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_decoder_device_prefix_lens(impl):
    """Lengths as a device tensor, with and without max_prefix (no host sync with it)."""
    lens = torch.tensor([300, 41], dtype=torch.int32, device="cuda")
    _decoder_case(13, FULL_SHAPE, lens.tolist(), 33, 0, max_prefix=300, lens_arg=lens, impl=impl)
    _decoder_case(14, SLIDING_SHAPE, lens.tolist(), 33, 1023, lens_arg=lens, impl=impl)
    _decoder_case(15, SLIDING_SHAPE, lens.tolist(), 33, 1023, max_prefix=1000, lens_arg=lens, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_decoder_valid_mask_left_padding(impl):
    gen = torch.Generator(device="cuda").manual_seed(5)
    lens = [1500, 1500, 1500]
    valid = torch.ones(3, 1600, dtype=torch.bool, device="cuda")
    valid[0, :700] = False  # left padding of a shorter prompt
    valid[1, :1490] = False
    valid[2] = torch.rand(1600, generator=gen, device="cuda") > 0.3
    _decoder_case(21, SLIDING_SHAPE, lens, 256, 1023, valid=valid, impl=impl)
    _decoder_case(22, FULL_SHAPE, lens, 256, 0, valid=valid, impl=impl)


def _encoder_case(seed, shape, start, t, ring, batch=2, *, valid=None, impl=None):
    from dgemma.ops.cuda_attention import encoder_attention

    gen = torch.Generator(device="cuda").manual_seed(seed)
    d, hq, hkv, window = shape["d"], shape["hq"], shape["hkv"], shape["window"]
    cache = Cache(gen, [start] * batch, hkv, d, ring, extra_slots=t + 5)
    q = _randn(gen, batch, t, hq, d, scale=1.5 / math.sqrt(d)).transpose(1, 2)
    k = _randn(gen, batch, t, hkv, d).transpose(1, 2)
    v = _randn(gen, batch, t, hkv, d).transpose(1, 2)
    out = torch.full((batch, t, hq, d), float("nan"), dtype=BF16, device="cuda")
    encoder_attention(q, k, v, cache.k, cache.v, start, ring, window, valid=valid, out=out, impl=impl)
    first = start - (min(start, window - 1) if window else start)
    qpos = torch.arange(start, start + t, device="cuda")
    kpos = torch.arange(first, start + t, device="cuda")
    mask = kpos[None] <= qpos[:, None]
    if window:
        mask &= kpos[None] > qpos[:, None] - window
    for i in range(batch):
        hk, hv = cache.hist[i]
        keys, values = torch.cat((hk[:, first:], k[i]), dim=1), torch.cat((hv[:, first:], v[i]), dim=1)
        m = mask if valid is None else mask & valid[i, kpos][None]
        rows = m.any(dim=1)
        _check(out[i], _reference(q[i], keys, values, m, torch.float32), _reference(q[i], keys, values, m, BF16),
               rows)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("start,t", [(0, 300), (1, 64), (1023, 129), (1500, 1100), (5000, 77)])
def test_encoder_sliding(start, t, impl):
    _encoder_case(start + t, SLIDING_SHAPE, start, t, 1023, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hq,hkv", [(6, 2), (16, 2)])
def test_encoder_head_groups(hq, hkv, impl):
    """Causal rows packed head-minor: a tile's key range is the union of its tokens' windows."""
    shape = dict(d=256, hq=hq, hkv=hkv, window=1024)
    _encoder_case(hq, shape, 700, 451, 1023, impl=impl)
    _encoder_case(hq + 1, shape, 0, 1500, 1023, impl=impl)
    _encoder_case(hq + 2, dict(d=512, hq=hq, hkv=hkv, window=None), 300, 333, 0, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("start,t", [(0, 333), (1000, 200), (0, 2048)])
def test_encoder_full(start, t, impl):
    _encoder_case(7 * start + t, FULL_SHAPE, start, t, 0, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_encoder_left_padding_rows_are_zero(impl):
    gen = torch.Generator(device="cuda").manual_seed(3)
    valid = torch.ones(2, 400, dtype=torch.bool, device="cuda")
    valid[0, :50] = False
    valid[1] = torch.rand(400, generator=gen, device="cuda") > 0.5
    _encoder_case(31, SLIDING_SHAPE, 0, 300, 1023, valid=valid, impl=impl)
    _encoder_case(32, FULL_SHAPE, 0, 300, 0, valid=valid, impl=impl)


def _spec(kind):
    if kind == SLIDING:
        return LayerSpec(0, SLIDING, 256, 8, RopeSpec("default", 1e4), 1024)
    return LayerSpec(5, FULL, 512, 2, RopeSpec("proportional", 1e6, 0.25), None)


@pytest.mark.parametrize("kind", [SLIDING, FULL])
@pytest.mark.parametrize("write", [False, True])
def test_qkv_prep_matches_reference(kind, write):
    from dgemma.ops.cuda_attention import qkv_prep

    spec = _spec(kind)
    gen = torch.Generator(device="cuda").manual_seed(41)
    b, t, hq, hkv, d, eps, start = 2, 53, 16, spec.num_kv_heads, spec.head_dim, 1e-6, 1200
    k_eq_v = kind == FULL
    width = (hq + hkv * (1 if k_eq_v else 2)) * d
    fused = _randn(gen, b, t, width + 8, scale=3.0)  # one projection output; q/k/v are column slices
    q_proj = fused[..., :hq * d]
    k_proj = fused[..., hq * d:(hq + hkv) * d]
    v_proj = None if k_eq_v else fused[..., (hq + hkv) * d:width]
    q_norm, k_norm = _randn(gen, d, scale=0.5), _randn(gen, d, scale=0.5)
    cos, sin = cos_sin(inverse_frequencies(spec), torch.arange(start, start + t, device="cuda")[None], BF16)
    ring = 37 if kind == SLIDING else 0
    slots = ring if ring else start + t + 4
    cache_k = _randn(gen, b, hkv, slots, d) if write else None
    cache_v = _randn(gen, b, hkv, slots, d) if write else None
    before = (cache_k.clone(), cache_v.clone()) if write else None
    q, k, v = qkv_prep(q_proj, k_proj, v_proj, q_norm, k_norm, cos, sin, eps, cache_k=cache_k, cache_v=cache_v,
                       start=start, ring_size=ring)
    rq = REF.rope(REF.rms_norm(q_proj.reshape(b, t, hq, d), q_norm, eps), cos, sin)
    rk = REF.rope(REF.rms_norm(k_proj.reshape(b, t, hkv, d), k_norm, eps), cos, sin)
    rv = REF.rms_norm((k_proj if k_eq_v else v_proj).reshape(b, t, hkv, d), None, eps)
    for got, ref in ((q, rq), (k, rk), (v, rv)):
        assert got.shape == ref.shape
        diff = (got.float() - ref.float()).abs()
        # Same rounding steps; rsqrt vs pow and the sum order may move a value by one bf16 ulp.
        assert (diff <= ref.float().abs() * 2**-7 + 1e-6).all()
        assert (diff > 0).float().mean() < 0.02
    if write:
        exp_k, exp_v = before
        keep = min(t, ring) if ring else t
        pos = torch.arange(start + t - keep, start + t, device="cuda")
        slot = pos % ring if ring else pos
        exp_k[:, :, slot] = k.transpose(1, 2)[:, :, t - keep:]
        exp_v[:, :, slot] = v.transpose(1, 2)[:, :, t - keep:]
        assert torch.equal(cache_k, exp_k) and torch.equal(cache_v, exp_v)


def test_tile_shape_and_argument_errors():
    from dgemma import _ext
    from dgemma.ops.cuda_attention import decoder_attention

    lib = _ext.require_cuda()
    assert tuple(lib.attention_tile_shape(256)) == (64, 64)
    assert tuple(lib.attention_tile_shape(512)) == (32, 32)
    assert tuple(lib.attention_tile_shape(256, 1)) == (128, 64)
    assert tuple(lib.attention_tile_shape(512, 1)) == (64, 32)
    assert tuple(lib.attention_tile_shape(256, 2)) == (128, 48)
    assert tuple(lib.attention_tile_shape(512, 2)) == (64, 32)
    with pytest.raises(ValueError, match="head_dim 128"):
        lib.attention_tile_shape(128)

    gen = torch.Generator(device="cuda").manual_seed(0)
    q = _randn(gen, 1, 16, 8, 128)
    kv = _randn(gen, 1, 8, 8, 128)
    with pytest.raises(ValueError, match="head_dim 128"):
        decoder_attention(q, kv, kv, kv, kv, 0, 0, None)
    q = _randn(gen, 1, 16, 8, 256)
    cache = _randn(gen, 1, 8, 100, 256)
    tail = _randn(gen, 1, 8, 8, 256)
    with pytest.raises(ValueError, match="ring of 100 slots"):
        decoder_attention(q, cache, cache, tail, tail, 500, 100, 1024)
    with pytest.raises(ValueError, match="exceeds the cache's 100 slots"):
        decoder_attention(q, cache, cache, tail, tail, 500, 0, None)
    with pytest.raises(ValueError, match="tail_k has shape"):
        decoder_attention(q, cache, cache, tail[:, :, :5], tail, 50, 0, None)
    with pytest.raises(ValueError, match="dtype float32"):
        decoder_attention(q.float(), cache, cache, tail, tail, 50, 0, None)
    with pytest.raises(ValueError, match="attention impl 3 is not an implementation"):
        lib.attention_tile_shape(256, 3)


PINGPONG_PROBE = """
import math, sys, torch
from dgemma.ops.cuda_attention import decoder_attention, encoder_attention
impl = sys.argv[2] if len(sys.argv) > 2 else "wgmma"
gen = torch.Generator(device="cuda").manual_seed(9)
def randn(*s, scale=1.0):
    return (torch.randn(*s, generator=gen, device="cuda") * scale).to(torch.bfloat16)
out = {}
# decoder_short: 27 and 20 keys, one key tile (a pipeline whose later stages hold nothing).
for name, lens, t, splits in (("decoder", [1500, 40], 256, None), ("decoder_split", [3000, 7], 77, 4),
                              ("decoder_short", [7, 0], 20, None)):
    ck, cv = randn(2, 8, 1023, 256), randn(2, 8, 1023, 256)
    q = randn(2, t, 16, 256, scale=1.5 / 16).transpose(1, 2)
    tk, tv = randn(2, t, 8, 256).transpose(1, 2), randn(2, t, 8, 256).transpose(1, 2)
    out[name] = decoder_attention(q, ck, cv, tk, tv, lens, 1023, 1024, num_splits=splits, impl=impl).cpu()
ck, cv = randn(1, 8, 1023, 256), randn(1, 8, 1023, 256)
q = randn(1, 600, 16, 256, scale=1.5 / 16).transpose(1, 2)
k, v = randn(1, 600, 8, 256).transpose(1, 2), randn(1, 600, 8, 256).transpose(1, 2)
out["encoder"] = encoder_attention(q, k, v, ck, cv, 700, 1023, 1024, impl=impl).cpu()
# A full layer (head_dim 512, linear cache) over a long prefix, split.
ck, cv = randn(1, 2, 5000, 512), randn(1, 2, 5000, 512)
q = randn(1, 100, 16, 512, scale=1.5 / 23).transpose(1, 2)
tk, tv = randn(1, 100, 2, 512).transpose(1, 2), randn(1, 100, 2, 512).transpose(1, 2)
out["full"] = decoder_attention(q, ck, cv, tk, tv, [4321], 0, None, num_splits=3, impl=impl).cpu()
torch.save(out, sys.argv[1])
"""


def test_wgmma_pingpong_changes_only_the_issue_order(tmp_path):
    """DGEMMA_ATTENTION_PINGPONG=0 / 1 (read once per process, so each in its own): the warpgroups' ping-pong only
    orders their Q·Kᵀ issue, so the outputs are bit-identical; another value is refused by name."""
    import os
    import subprocess
    import sys

    outs = []
    for flag in ("0", "1"):
        path = tmp_path / f"pingpong{flag}.pt"
        r = subprocess.run([sys.executable, "-c", PINGPONG_PROBE, str(path)], capture_output=True, text=True,
                           env=dict(os.environ, DGEMMA_ATTENTION_PINGPONG=flag), timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(torch.load(path))
    for key in outs[0]:
        assert torch.equal(outs[0][key], outs[1][key]), key
        assert torch.isfinite(outs[0][key].float()).all(), key
    r = subprocess.run([sys.executable, "-c", PINGPONG_PROBE, str(tmp_path / "x.pt")], capture_output=True, text=True,
                       env=dict(os.environ, DGEMMA_ATTENTION_PINGPONG="yes"), timeout=300)
    assert r.returncode != 0 and "DGEMMA_ATTENTION_PINGPONG=yes is not 0 or 1" in r.stderr


def test_the_mma_sync_kernels_pipeline_depth_changes_no_result(tmp_path):
    """DGEMMA_ATTENTION_STAGES=2 / 3 (read once per process, so each in its own): the mma.sync kernel requests each
    key tile one or two tiles ahead; the same products in the same order, so bit-identical outputs (decoder, split,
    encoder, a split full layer); another value is refused by name."""
    import os
    import subprocess
    import sys

    outs = []
    for stages in ("2", "3"):
        path = tmp_path / f"stages{stages}.pt"
        r = subprocess.run([sys.executable, "-c", PINGPONG_PROBE, str(path), "mma_sync"], capture_output=True,
                           text=True, env=dict(os.environ, DGEMMA_ATTENTION_STAGES=stages), timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(torch.load(path))
    for key in outs[0]:
        assert torch.equal(outs[0][key], outs[1][key]), key
        assert torch.isfinite(outs[0][key].float()).all(), key
    r = subprocess.run([sys.executable, "-c", PINGPONG_PROBE, str(tmp_path / "x.pt"), "mma_sync"], capture_output=True,
                       text=True, env=dict(os.environ, DGEMMA_ATTENTION_STAGES="4"), timeout=300)
    assert r.returncode != 0 and "DGEMMA_ATTENTION_STAGES=4 is not 2 or 3" in r.stderr


# Structured probes: each isolates one half of the kernel, so a failure says which (and the message where).


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [SLIDING_SHAPE, FULL_SHAPE], ids=["hd256", "hd512"])
def test_equal_scores_average_the_values(shape, impl):
    """K = 0 makes every score 0, so each query's output is the plain mean of the values it sees (the P·V half and
    the key gathers alone: cached prefix from a ring or linear cache, then the tail)."""
    from dgemma.ops.cuda_attention import decoder_attention

    gen = torch.Generator(device="cuda").manual_seed(77)
    d, hq, hkv, window = shape["d"], shape["hq"], shape["hkv"], shape["window"]
    ring = 1023 if window else 0
    lens, canvas = [1500, 300], 100
    cache = Cache(gen, lens, hkv, d, ring)
    cache.k.zero_()
    q = _randn(gen, 2, canvas, hq, d).transpose(1, 2)
    zeros = torch.zeros(2, hkv, canvas, d, dtype=BF16, device="cuda")
    cv = _randn(gen, 2, canvas, hkv, d).transpose(1, 2)
    out = decoder_attention(q, cache.k, cache.v, zeros, cv, lens, ring, window, impl=impl)
    for i, length in enumerate(lens):
        first = length - (min(length, window - 1) if window else length)
        values = torch.cat((cache.hist[i][1][:, first:], cv[i]), dim=1).float()  # [Hkv, keys, D]
        want = values.mean(dim=1).repeat_interleave(hq // hkv, dim=0)  # [Hq, D]
        got = out[i].float()  # [T, Hq, D]
        err = (got - want[None]).abs()
        assert err.max().item() <= 2e-2 * want.abs().max().item() + 1e-3, _where(err, 1e-2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [dict(d=256, hq=6, hkv=2, window=1024), dict(d=512, hq=16, hkv=2, window=None)],
                         ids=["hd256", "hd512"])
def test_one_hot_values_return_the_probabilities(shape, impl):
    """V[key] = e_key (one-hot over the head dim) makes out[t, h, key] = softmax(q·kᵀ)[t, h, key]: the Q·Kᵀ half
    and the softmax checked probability by probability (a misplaced score shows up as a misplaced probability)."""
    from dgemma.ops.cuda_attention import decoder_attention

    gen = torch.Generator(device="cuda").manual_seed(78)
    d, hq, hkv, window = shape["d"], shape["hq"], shape["hkv"], shape["window"]
    t = d - 3  # keys = the canvas alone (no prefix), one dim each, the last 3 dims unused
    q = _randn(gen, 1, t, hq, d, scale=2.0 / math.sqrt(d)).transpose(1, 2)
    k = _randn(gen, 1, t, hkv, d).transpose(1, 2)
    v = torch.eye(t, d, dtype=BF16, device="cuda")[None, None].expand(1, hkv, t, d).contiguous()
    empty = torch.zeros(1, hkv, 8, d, dtype=BF16, device="cuda")
    out = decoder_attention(q, empty, empty, k, v, 0, 8 if window else 0, window, impl=impl)[0].float()  # [T, Hq, D]
    scores = torch.einsum("htd,hkd->htk", q[0].float(), k[0].float().repeat_interleave(hq // hkv, dim=0))
    probs = torch.softmax(scores, dim=-1).transpose(0, 1)  # [T, Hq, keys]
    err = (out[..., :t] - probs).abs()
    assert err.max().item() <= 1e-2 * probs.max().item() + 1e-4, _where(err, 1e-2 * probs.max().item())
    assert (out[..., t:] == 0).all(), "dims no key's value touches must stay 0"
