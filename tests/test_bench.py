"""`dgemma bench` on the CPU preset: the command always runs and writes the documented schema."""

import json

import pytest

from dgemma.cli import main


def test_bench_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "e2e.json", tmp_path / "e2e.png"
    rc = main(["bench", "--iters", "2", "--warmup", "1", "--steps", "2", "--batch", "1,2", "--prefix-lengths",
               "16,40", "--prompt-length", "24", "--baseline", "transformers", "--json", str(out), "--plot", str(png)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert {"device", "torch", "cuda", "commit", "command", "results"} <= set(report)
    names = {r["name"] for r in report["results"]}
    for name in ("prefill_t24_b1", "denoise_step_bfloat16_b1", "decoder_forward_bfloat16_b1",
                 "first_draft_bfloat16_b1", "block2_bfloat16_b1", "denoise_step_bfloat16_b2",
                 "denoise_step_bfloat16_b1_p40", "hf_vs_dgemma_step_b1", "peak_memory"):
        assert name in names
    block = next(r for r in report["results"] if r["name"] == "block2_bfloat16_b1")
    assert block["tok_per_s"] == pytest.approx(256 / (block["median_ms"] / 1e3))
    assert all(r["median_ms"] > 0 for r in report["results"] if r["name"] != "peak_memory")
    assert all(r["roofline_ms"] > 0 for r in report["results"] if "roofline_ms" in r)
    hf = next(r for r in report["results"] if r["name"] == "hf_vs_dgemma_step_b1")
    assert hf["speedup"] == pytest.approx(hf["median_ms"] / hf["dgemma_ms"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "roofline ms" in table and "denoise_step_bfloat16_b1" in table


def test_bench_rejects_bad_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--batch", "0,2"])
    assert e.value.code == 2
    assert "expected comma-separated positive integers, got '0,2'" in capsys.readouterr().err
    assert main(["bench", "--precision", "bfloat16", "--batch", "2", "--baseline", "transformers", "--iters", "1",
                 "--steps", "1"]) == 2
    assert "include 1 in --batch" in capsys.readouterr().err
