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


def test_split_kv_can_be_switched_off_for_triage(monkeypatch):
    """DGEMMA_DISABLE_KERNELS=split_kv: the CUDA attention plans one split (no in-kernel combine); a forced count
    (tests) still wins."""
    import torch

    from dgemma.ops import cuda_attention as ca

    seen = []

    class Lib:
        def attention_tile_shape(self, d):
            return 64, 64

        def attention_forward(self, *args):
            seen.append(args[-3])  # num_splits

    monkeypatch.setattr(ca._ext, "require_cuda", lambda: Lib())
    monkeypatch.setattr(ca._ext, "current_stream", lambda device: 0)
    monkeypatch.setattr(ca, "_num_sms", lambda device: 132)
    monkeypatch.setattr(ca, "_split_counters", lambda device, shape: torch.zeros(shape, dtype=torch.int32))
    q = torch.zeros(1, 16, 256, 256, dtype=torch.bfloat16)
    cache = torch.zeros(1, 8, 1023, 256, dtype=torch.bfloat16)
    tail = torch.zeros(1, 8, 256, 256, dtype=torch.bfloat16)
    out = torch.empty(1, 256, 16, 256, dtype=torch.bfloat16)
    ca.decoder_attention(q, cache, cache, tail, tail, 1023, 1023, 1024, out=out)
    monkeypatch.setenv("DGEMMA_DISABLE_KERNELS", "split_kv")
    ca.decoder_attention(q, cache, cache, tail, tail, 1023, 1023, 1024, out=out)
    ca.decoder_attention(q, cache, cache, tail, tail, 1023, 1023, 1024, out=out, num_splits=3)
    assert seen[0] > 1 and seen[1] == 1 and seen[2] == 3
