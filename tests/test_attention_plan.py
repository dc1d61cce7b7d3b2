"""CPU tests of the attention planner (split-KV chunking, ring slots, tile counts)."""

import pytest

from dgemma.attention_plan import (MIN_TILES_PER_SPLIT, key_tiles, plan_splits, ring_slot_ranges,
                                   visible_prefix)


@pytest.mark.parametrize("length,window,expected", [
    (0, 1024, 0), (1, 1024, 1), (1022, 1024, 1022), (1023, 1024, 1023), (1024, 1024, 1023),
    (1025, 1024, 1023), (70000, None, 70000), (70000, 0, 70000), (5, 1, 0),
])
def test_visible_prefix(length, window, expected):
    assert visible_prefix(length, window) == expected


def test_visible_prefix_rejects_bad_input():
    with pytest.raises(ValueError, match="prefix length -1"):
        visible_prefix(-1, 1024)
    with pytest.raises(ValueError, match="window -3"):
        visible_prefix(5, -3)


@pytest.mark.parametrize("length", [0, 1, 7, 1022, 1023, 1024, 1025, 2046, 5000, 70001])
@pytest.mark.parametrize("ring", [1023, 1040])
def test_ring_slot_ranges_match_cache_positions(length, ring):
    """The ranges list exactly the slots p % ring of the last window-1 positions, in position order."""
    window = 1024
    first = max(0, length - (window - 1))
    expected = [p % ring for p in range(first, length)]
    got = [s for a, b in ring_slot_ranges(length, ring, window) for s in range(a, b)]
    assert got == expected
    assert len(ring_slot_ranges(length, ring, window)) <= 2


def test_ring_slot_ranges_full_layer_and_too_small_ring():
    assert ring_slot_ranges(5000, 0, None) == [(0, 5000)]
    assert ring_slot_ranges(0, 0, None) == []
    with pytest.raises(ValueError, match="ring of 100 slots"):
        ring_slot_ranges(5000, 100, 1024)


@pytest.mark.parametrize("keys,bn,tiles", [(0, 64, 0), (1, 64, 1), (64, 64, 1), (65, 64, 2), (33024, 32, 1032)])
def test_key_tiles(keys, bn, tiles):
    assert key_tiles(keys, bn) == tiles


def _covers(plan, keys, bn):
    return plan.num_splits * plan.split_tiles * bn >= keys and (plan.num_splits - 1) * plan.split_tiles * bn < keys


@pytest.mark.parametrize("prefix", [0, 1, 1022, 1023, 1024, 1025, 5000, 70000])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_decoder_plan_covers_keys_without_empty_splits(prefix, batch):
    for window, bm, bn in ((1024, 64, 64), (None, 32, 32)):
        plan = plan_splits(batch=batch, q_heads=16, queries=256, max_prefix=prefix, window=window, block_m=bm,
                           block_n=bn, num_sms=132)
        keys = visible_prefix(prefix, window) + 256
        assert plan.key_tiles == key_tiles(keys, bn)
        assert plan.query_tiles == 256 // bm
        assert _covers(plan, keys, bn)
        if plan.num_splits > 1:
            assert plan.split_tiles >= MIN_TILES_PER_SPLIT


def test_decoder_plan_fills_the_gpu():
    # Sliding layer, batch 1: 64 blocks alone would leave half the SMs idle.
    plan = plan_splits(batch=1, q_heads=16, queries=256, max_prefix=1023, window=1024, block_m=64, block_n=64,
                       num_sms=132)
    assert plan.num_splits == 2 and plan.split_tiles == 10
    # Full layer, long prefix, batch 1: 128 blocks already fill a wave.
    plan = plan_splits(batch=1, q_heads=16, queries=256, max_prefix=32768, window=None, block_m=32, block_n=32,
                       num_sms=132)
    assert plan.num_splits == 1 and plan.split_tiles == plan.key_tiles == 1032
    # Few query tiles, long prefix: split.
    plan = plan_splits(batch=1, q_heads=2, queries=16, max_prefix=70000, window=None, block_m=32, block_n=32,
                       num_sms=132)
    assert plan.num_splits > 32


def test_causal_plan_never_splits_unless_forced():
    plan = plan_splits(batch=1, q_heads=16, queries=4096, max_prefix=0, window=None, block_m=32, block_n=32,
                       num_sms=132, causal=True)
    assert plan.num_splits == 1 and plan.query_tiles == 128
    plan = plan_splits(batch=1, q_heads=16, queries=100, max_prefix=0, window=None, block_m=32, block_n=32,
                       num_sms=132, causal=True, num_splits=3)
    assert (plan.num_splits, plan.split_tiles) == (2, 2)  # 4 key tiles: 3 splits of 2 leave one empty


def test_forced_splits_clamp_to_key_tiles_and_workspace():
    plan = plan_splits(batch=2, q_heads=4, queries=5, max_prefix=10, window=None, block_m=64, block_n=64,
                       num_sms=132, num_splits=8)
    assert (plan.num_splits, plan.split_tiles) == (1, 1)
    assert plan.workspace_shapes(2, 4, 5, 256) is None
    plan = plan_splits(batch=2, q_heads=4, queries=5, max_prefix=1000, window=None, block_m=64, block_n=64,
                       num_sms=132, num_splits=4)
    assert plan.num_splits == 4
    assert plan.workspace_shapes(2, 4, 5, 256) == ((4, 2, 4, 5, 256), (4, 2, 4, 5))


def test_plan_rejects_bad_sizes():
    with pytest.raises(ValueError, match="queries 0"):
        plan_splits(batch=1, q_heads=1, queries=0, max_prefix=1, window=None, block_m=64, block_n=64, num_sms=1)
    with pytest.raises(ValueError, match="num_splits 0"):
        plan_splits(batch=1, q_heads=1, queries=1, max_prefix=1, window=None, block_m=64, block_n=64, num_sms=1,
                    num_splits=0)


def test_split_counters_are_zeroed_outside_captures_and_shared(monkeypatch):
    """One zeroed counter buffer per device, made outside any CUDA-graph capture: a capture that would have to
    create or grow it fails (its zero-fill would be recorded in one graph only), and later calls reuse it."""
    import torch

    from dgemma.ops import cuda_attention as ca

    monkeypatch.setattr(ca, "_COUNTERS", {})
    monkeypatch.setattr(ca, "_RETIRED_COUNTERS", [])
    capturing = [True]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    dev = torch.device("cpu", 0)
    with pytest.raises(RuntimeError, match="must be allocated before a CUDA graph capture"):
        ca._split_counters(dev, (2, 16, 4))
    capturing[0] = False
    a = ca._split_counters(dev, (2, 16, 4))
    assert a.shape == (2, 16, 4) and a.dtype == torch.int32 and int(a.abs().sum()) == 0
    capturing[0] = True
    b = ca._split_counters(dev, (1, 16, 4))  # inside a capture: the same zeroed buffer
    assert b.data_ptr() == a.data_ptr()
    with pytest.raises(RuntimeError, match=f"needs {ca.MIN_COUNTERS + 1} zeroed counters on cuda:0"):
        ca._split_counters(dev, (1, 1, ca.MIN_COUNTERS + 1))
    capturing[0] = False
    c = ca._split_counters(dev, (1, 1, ca.MIN_COUNTERS + 1))
    assert c.data_ptr() != a.data_ptr() and len(ca._RETIRED_COUNTERS) == 1


class _FakeLib:
    """The extension's attention entry points as the wrapper calls them, recording each call's arguments."""

    def __init__(self):
        self.calls = []

    def attention_tile_shape(self, d, impl=0):
        return {(256, 0): (64, 64), (512, 0): (32, 32), (256, 1): (128, 64), (512, 1): (64, 32), (256, 2): (128, 48),
                (512, 2): (64, 32)}[(d, impl)]

    def attention_forward(self, *args):
        names = ("counters", "num_splits", "split_tiles", "stream", "impl")
        self.calls.append(dict(zip(names, (args[10],) + args[-4:])))


def _fake_cuda(monkeypatch):
    import torch

    from dgemma.ops import cuda_attention as ca

    lib = _FakeLib()
    monkeypatch.setattr(ca._ext, "require_cuda", lambda: lib)
    monkeypatch.setattr(ca._ext, "current_stream", lambda device: 0)
    monkeypatch.setattr(ca, "_num_sms", lambda device: 132)
    monkeypatch.setattr(ca, "_split_counters", lambda device, shape: torch.zeros(shape, dtype=torch.int32))
    return ca, lib


def _decoder_tensors(d=256, hq=16, hkv=8, slots=1023, t=256):
    import torch

    q = torch.zeros(1, hq, t, d, dtype=torch.bfloat16)
    cache = torch.zeros(1, hkv, slots, d, dtype=torch.bfloat16)
    tail = torch.zeros(1, hkv, t, d, dtype=torch.bfloat16)
    out = torch.empty(1, t, hq, d, dtype=torch.bfloat16)
    return q, cache, tail, out


def test_split_kv_can_be_switched_off_for_triage(monkeypatch):
    """DGEMMA_DISABLE_KERNELS=split_kv: the CUDA attention plans one split (no in-kernel combine); a forced count
    (tests) still wins."""
    ca, lib = _fake_cuda(monkeypatch)
    monkeypatch.delenv("DGEMMA_ATTENTION", raising=False)
    q, cache, tail, out = _decoder_tensors()
    ca.decoder_attention(q, cache, cache, tail, tail, 1023, 1023, 1024, out=out)
    monkeypatch.setenv("DGEMMA_DISABLE_KERNELS", "split_kv")
    ca.decoder_attention(q, cache, cache, tail, tail, 1023, 1023, 1024, out=out)
    ca.decoder_attention(q, cache, cache, tail, tail, 1023, 1023, 1024, out=out, num_splits=3)
    seen = [c["num_splits"] for c in lib.calls]
    assert seen[0] > 1 and seen[1] == 1 and seen[2] == 3


def test_the_attention_kernel_comes_from_the_argument_or_the_environment(monkeypatch):
    """DGEMMA_ATTENTION=wgmma runs the wgmma kernel (KV-head counters over packed row tiles, keys counted from the
    tokens); an explicit impl wins; an unknown name is refused by name."""
    from dgemma.errors import DgemmaError

    ca, lib = _fake_cuda(monkeypatch)
    monkeypatch.delenv("DGEMMA_DISABLE_KERNELS", raising=False)
    monkeypatch.delenv("DGEMMA_ATTENTION", raising=False)
    assert ca.attention_impl() == ca.DEFAULT_IMPL == "auto" and set(ca.IMPLS) == {"mma_sync", "wgmma", "wgmma_deep"}
    q, cache, tail, out = _decoder_tensors()
    ca.decoder_attention(q, cache, cache, tail, tail, 1023, 1023, 1024, out=out)  # auto: batch 1 sliding -> mma_sync
    monkeypatch.setenv("DGEMMA_ATTENTION", "wgmma")
    ca.decoder_attention(q, cache, cache, tail, tail, 1023, 1023, 1024, out=out)
    ca.decoder_attention(q, cache, cache, tail, tail, 1023, 1023, 1024, out=out, impl="mma_sync")
    q5, cache5, tail5, out5 = _decoder_tensors(d=512, hkv=2, slots=4096)
    ca.decoder_attention(q5, cache5, cache5, tail5, tail5, 4000, 0, None, out=out5)
    ca.decoder_attention(q, cache, cache, tail, tail, 1023, 1023, 1024, out=out, impl="wgmma_deep")
    mma, wgmma, forced, full, deep = lib.calls
    assert (mma["impl"], wgmma["impl"], forced["impl"], full["impl"], deep["impl"]) == (0, 1, 0, 1, 2)
    # wgmma_deep packs the query heads like wgmma and plans over its own 48-key tiles.
    assert tuple(deep["counters"].shape) == (1, 8, 4)
    assert deep["num_splits"] * deep["split_tiles"] >= 27  # ceil((1023 + 256) / 48)
    assert tuple(mma["counters"].shape) == (1, 16, 4)  # [B, Hq, 256 / 64]
    assert tuple(wgmma["counters"].shape) == (1, 8, 4)  # [B, Hkv, 2 * 256 / 128]
    assert wgmma["num_splits"] * wgmma["split_tiles"] >= 20  # (1023 + 256) / 64 key tiles, from the tokens
    assert tuple(full["counters"].shape) == (1, 2, 32)  # [B, Hkv, 8 * 256 / 64]
    assert full["num_splits"] * full["split_tiles"] >= 133  # (4000 + 256) / 32
    monkeypatch.setenv("DGEMMA_ATTENTION", "fa3")
    with pytest.raises(DgemmaError, match=r"DGEMMA_ATTENTION = 'fa3' is not an attention implementation; "
                                          r"expected one of auto, mma_sync, wgmma, wgmma_deep"):
        ca.decoder_attention(q, cache, cache, tail, tail, 1023, 1023, 1024, out=out)
    with pytest.raises(DgemmaError, match=r"impl = 'tma' is not an attention implementation"):
        ca.attention_impl("tma")


@pytest.mark.parametrize("prefix", [0, 1023, 5000])
def test_packed_plan_counts_tokens_as_keys_and_packed_rows_as_query_tiles(prefix):
    """The wgmma kernel packs the 2 query heads of each of 8 KV heads: 512 rows of 128 per KV head, keys from the
    256 tokens (not the 512 rows), and at least as many blocks as one wave of 132 SMs asks for at batch 1."""
    plan = plan_splits(batch=1, q_heads=8, queries=2 * 256, max_prefix=prefix, window=1024, block_m=128, block_n=64,
                       num_sms=132, key_queries=256)
    keys = visible_prefix(prefix, 1024) + 256
    assert plan.key_tiles == key_tiles(keys, 64) and plan.query_tiles == 4
    assert _covers(plan, keys, 64)
    if prefix >= 1023:
        assert 8 * 4 * plan.num_splits >= 100
    with pytest.raises(ValueError, match="key_queries 0 must be positive"):
        plan_splits(batch=1, q_heads=8, queries=512, max_prefix=prefix, window=1024, block_m=128, block_n=64,
                    num_sms=132, key_queries=0)


@pytest.mark.parametrize("case,expected", [
    # encoder (causal): wgmma at both head dims
    (dict(head_dim=256, causal=True, batch=1, q_heads=16, kv_heads=8, queries=4096, max_prefix=0, window=1024),
     "wgmma"),
    (dict(head_dim=512, causal=True, batch=1, q_heads=16, kv_heads=2, queries=17, max_prefix=0, window=None), "wgmma"),
    # full layer decoder: by visible keys (4096 + 256 >= 4096; 1024 + 256 < 4096)
    (dict(head_dim=512, causal=False, batch=1, q_heads=16, kv_heads=2, queries=256, max_prefix=4096, window=None),
     "wgmma"),
    (dict(head_dim=512, causal=False, batch=1, q_heads=16, kv_heads=2, queries=256, max_prefix=1024, window=None),
     "mma_sync"),
    # sliding layer decoder: batch 1 packs 8 x 4 = 32 row tiles (< 132 / 2), batch 4 128 (>= 66)
    (dict(head_dim=256, causal=False, batch=1, q_heads=16, kv_heads=8, queries=256, max_prefix=1023, window=1024),
     "mma_sync"),
    (dict(head_dim=256, causal=False, batch=4, q_heads=16, kv_heads=8, queries=256, max_prefix=1023, window=1024),
     "wgmma"),
    (dict(head_dim=256, causal=False, batch=3, q_heads=16, kv_heads=8, queries=256, max_prefix=50, window=1024),
     "wgmma"),  # 96 tiles
    (dict(head_dim=256, causal=False, batch=2, q_heads=16, kv_heads=8, queries=256, max_prefix=50, window=1024),
     "wgmma"),  # 64 tiles: 128 >= 128 with 128 multiprocessors
])
def test_auto_picks_the_kernel_from_the_call_shape(case, expected):
    import dgemma.ops.cuda_attention as ca

    sms = 128 if case["batch"] == 2 else 132
    block_m = 128 if case["head_dim"] == 256 else 64  # the wgmma kernel's row tiles (attention_tiles.cuh)
    assert ca.kernel_for("auto", num_sms=sms, wgmma_block_m=block_m, **case) == expected
    for kernel in ca.IMPLS:  # a kernel's name is that kernel, whatever the shape
        assert ca.kernel_for(kernel, num_sms=sms, wgmma_block_m=block_m, **case) == kernel


def test_auto_runs_both_kernels_through_the_launcher(monkeypatch):
    """The default policy sends a batch-1 sliding decoder call to mma_sync and a 4,000-token full-layer call to wgmma
    (impl 0 and 1 at the launcher), each with its own tile shape's counters."""
    ca, lib = _fake_cuda(monkeypatch)
    monkeypatch.delenv("DGEMMA_DISABLE_KERNELS", raising=False)
    monkeypatch.delenv("DGEMMA_ATTENTION", raising=False)
    q, cache, tail, out = _decoder_tensors()
    ca.decoder_attention(q, cache, cache, tail, tail, 1023, 1023, 1024, out=out)
    q5, cache5, tail5, out5 = _decoder_tensors(d=512, hkv=2, slots=4096)
    ca.decoder_attention(q5, cache5, cache5, tail5, tail5, 4000, 0, None, out=out5)
    sliding, full = lib.calls
    assert (sliding["impl"], full["impl"]) == (0, 1)
    assert tuple(sliding["counters"].shape) == (1, 16, 4) and tuple(full["counters"].shape) == (1, 2, 32)
