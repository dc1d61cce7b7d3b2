import pytest
import torch

import dgemma
from dgemma.memory import check_fits, kv_cache_bytes, plan
from dgemma.random_checkpoint import preset_config, random_engine


def test_kv_bytes_equal_the_allocated_cache():
    eng = random_engine("tiny")
    for batch, context, rollback in [(1, 10, 0), (2, 100, 0), (3, 77, 16)]:
        cache = eng.new_cache(batch, context, rollback=rollback)
        assert kv_cache_bytes(eng.config, batch, context, eng.dtype, rollback) == cache.nbytes() + batch * context


def test_26b_plan_numbers():
    cfg = dgemma.ModelConfig.from_dict(preset_config("26b-a4b"))
    kv = kv_cache_bytes(cfg, 1, 32768, torch.bfloat16)
    # 25 sliding layers x 2 x 8 heads x 1023 x 256 + 5 full layers x 2 x 2 heads x 32768 x 512, bf16
    expected = 2 * (25 * 2 * 8 * 1023 * 256 + 5 * 2 * 2 * 32768 * 512) + 32768
    assert kv == expected
    p = plan(cfg, 26 * 2**30, 1, 32768, torch.bfloat16, fused_vocab_head=True)
    assert p.total == p.weights + p.kv_cache + p.workspace
    assert "GiB" in str(p)


def test_refuses_with_numbers():
    cfg = dgemma.ModelConfig.from_dict(preset_config("26b-a4b"))
    p = plan(cfg, 26 * 2**30, 64, 131072, torch.bfloat16)
    with pytest.raises(dgemma.OutOfMemoryError, match=r"batch 64 x context 131072 does not fit: needs [\d.]+ GiB more"):
        check_fits(p, 80 * 2**30)
    check_fits(plan(cfg, 26 * 2**30, 1, 4096, torch.bfloat16, fused_vocab_head=True), 80 * 2**30)
    with pytest.raises(dgemma.DgemmaError, match="context 300000 exceeds max_position_embeddings"):
        plan(cfg, 0, 1, 300000, torch.bfloat16)


def test_load_reports_the_plan(tmp_path, caplog):
    from dgemma.random_checkpoint import write_random_checkpoint

    path = write_random_checkpoint(tmp_path / "m", "tiny")
    with caplog.at_level("INFO", logger="dgemma"):
        eng = dgemma.load(path, max_batch=2, max_context=1000)
    assert "dgemma memory plan: weights" in caplog.text and "(batch 2, context 1000)" in caplog.text
    p = eng.memory_plan(2, 1000)
    assert p.weights == eng.info.weight_bytes and p.kv_cache == kv_cache_bytes(eng.config, 2, 1000, eng.dtype)
    with pytest.raises(dgemma.DgemmaError, match="exceeds max_position_embeddings"):
        dgemma.load(path, max_context=10**7)


def test_the_two_pass_head_statistics_add_their_fp32_logits_to_the_plan(monkeypatch):
    """DGEMMA_VOCAB_HEAD_STATS=two_pass / two_pass_cooperative keep fp32 logits [batch x canvas, vocab rounded up to 128]
    between the head's two passes: the plan counts them (1 GiB at batch 4 on 26B-A4B)."""
    from dgemma.config import ModelConfig
    from dgemma.memory import step_workspace_bytes

    cfg = ModelConfig.from_dict(preset_config("26b-a4b"))
    monkeypatch.delenv("DGEMMA_VOCAB_HEAD_STATS", raising=False)
    base = step_workspace_bytes(cfg, 4, 2048, torch.bfloat16, fused_vocab_head=True)
    for variant in ("two_pass", "two_pass_cooperative"):
        monkeypatch.setenv("DGEMMA_VOCAB_HEAD_STATS", variant)
        extra = step_workspace_bytes(cfg, 4, 2048, torch.bfloat16, fused_vocab_head=True) - base
        assert extra == 4 * cfg.canvas_length * 262144 * 4 == 2**30
    monkeypatch.setenv("DGEMMA_VOCAB_HEAD_STATS", "cooperative")
    assert step_workspace_bytes(cfg, 4, 2048, torch.bfloat16, fused_vocab_head=True) == base


def test_the_moe_rows_are_padded_to_the_extensions_expert_gemm_tile(monkeypatch):
    """The plan counts the MoE's rows as the CUDA pipeline pads them: each expert's to the token tile the extension
    chooses (asked of dgemma._C, not restated); without the extension, the routed rows."""
    from dgemma import _ext
    from dgemma.memory import _moe_rows

    lib = _ext.extension()
    # One 256-token canvas (top-8 of 128 experts: ~16 rows each), four canvases, a prefill.
    for routed, tile in ((2048, 32), (8192, 64), (262144, 128)):
        assert lib.moe_gemm_tile(routed, 128) == tile
        assert _moe_rows(routed, 128) == routed + 128 * (tile - 1)

    def missing():
        raise dgemma.BackendUnavailableError("no extension")
    monkeypatch.setattr(_ext, "extension", missing)
    assert _moe_rows(2048, 128) == 2048
