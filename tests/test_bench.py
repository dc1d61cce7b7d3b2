"""`dgemma bench` on the CPU preset: the command always runs and writes the documented schema."""

import json

import pytest

from dgemma.cli import main


def test_bench_json_and_plot(tmp_path, capsys, monkeypatch):
    from dgemma import steps

    # The block rows' commit pass is generate's: the stepper's (graph-replayed on CUDA), not Engine.encode.
    commits = []
    real_commit = steps.TorchStreamStepper.commit
    monkeypatch.setattr(steps.TorchStreamStepper, "commit",
                        lambda self, ids: (commits.append(ids.shape), real_commit(self, ids))[1])
    out, png = tmp_path / "e2e.json", tmp_path / "e2e.png"
    rc = main(["bench", "--iters", "2", "--warmup", "1", "--steps", "2", "--batch", "1,2", "--prefix-lengths",
               "16,40", "--prompt-length", "24", "--prefill-lengths", "40", "--baseline", "transformers",
               "--json", str(out), "--plot", str(png)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert {"device", "torch", "cuda", "commit", "command", "results", "kernel_settings"} <= set(report)
    assert report["kernel_settings"]["DGEMMA_DENSE_SCHEDULE"] == ""
    names = {r["name"] for r in report["results"]}
    for name in ("copy_bandwidth", "prefill_t24_bfloat16_b1", "denoise_step_bfloat16_b1",
                 "decoder_forward_bfloat16_b1", "first_draft_bfloat16_b1", "block2_bfloat16_b1",
                 "denoise_step_bfloat16_b2", "denoise_step_bfloat16_b1_p40", "transformers_step_bf16_b1",
                 "transformers_step_bf16_b2", "server_decoder_pass_bfloat16_b2", "prefill_t40_bfloat16_b1",
                 "peak_memory"):
        assert name in names
    assert {(1, 256), (2, 256)} <= set(commits)
    block = next(r for r in report["results"] if r["name"] == "block2_bfloat16_b1")
    assert block["tok_per_s"] == pytest.approx(256 / (block["median_ms"] / 1e3))
    assert all(r["median_ms"] > 0 for r in report["results"] if r["name"] != "peak_memory")
    assert all(r["roofline_ms"] > 0 for r in report["results"] if "roofline_ms" in r)
    for b in (1, 2):
        hf = next(r for r in report["results"] if r["name"] == f"transformers_step_bf16_b{b}")
        ours = next(r for r in report["results"] if r["name"] == f"denoise_step_bfloat16_b{b}")
        assert hf["ratio"] == pytest.approx(hf["median_ms"] / ours["median_ms"]) and hf["dgemma_ms"] == ours["median_ms"]
    server = next(r for r in report["results"] if r["name"] == "server_decoder_pass_bfloat16_b2")
    assert server["batch"] == 2 and server["speedup"] == pytest.approx(server["one_at_a_time_ms"] / server["median_ms"])
    # The roofline's denominator is this run's copy bandwidth, not a constant.
    bw = next(r for r in report["results"] if r["name"] == "copy_bandwidth")["gb_per_s"]
    step = next(r for r in report["results"] if r["name"] == "denoise_step_bfloat16_b1")
    assert bw > 0.1 and step["roofline_ms"] == pytest.approx(step["bytes"] / (bw * 1e9) * 1e3)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "roofline ms" in table and "denoise_step_bfloat16_b1" in table


def test_bench_rejects_bad_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--batch", "0,2"])
    assert e.value.code == 2
    assert "expected comma-separated positive integers, got '0,2'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["bench", "--precision", "int4"])
    assert e.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err


def test_profile_summary_counts_kernels_syncs_and_busy_time():
    """The per-step columns on a GPU: kernels, host synchronisations, and the union of kernel intervals."""
    from types import SimpleNamespace as NS

    from torch.autograd import DeviceType

    from dgemma.bench import summarise_profile

    def ev(name, kind, start, end):
        return NS(name=name, device_type=kind, time_range=NS(start=start, end=end))

    events = [ev("gemm", DeviceType.CUDA, 0, 100), ev("norm", DeviceType.CUDA, 50, 150),  # overlapping
              ev("head", DeviceType.CUDA, 300, 400), ev("cudaLaunchKernel", DeviceType.CPU, 0, 1),
              ev("cudaStreamSynchronize", DeviceType.CPU, 5, 6), ev("cudaMemcpy", DeviceType.CPU, 7, 8),
              ev("aten::add", DeviceType.CPU, 0, 3)]
    events.append(ev("gemm", DeviceType.CUDA, 500, 560))
    assert summarise_profile(events) == {
        "kernels": 4, "host_syncs": 2, "gpu_busy_ms": 0.31,
        "top_kernels": [{"name": "gemm", "launches": 2, "total_ms": 0.16}, {"name": "norm", "launches": 1,
                        "total_ms": 0.1}, {"name": "head", "launches": 1, "total_ms": 0.1}]}


def test_bench_picks_the_kernels_for_its_run_only(tmp_path, monkeypatch):
    """--attention / --vocab-head choose the kernels for the run (recorded in the JSON) and leave the environment as
    it was."""
    import os

    monkeypatch.delenv("DGEMMA_ATTENTION", raising=False)
    monkeypatch.setenv("DGEMMA_VOCAB_HEAD", "mma_sync")
    out = tmp_path / "e2e.json"
    rc = main(["bench", "--iters", "1", "--warmup", "1", "--steps", "2", "--prompt-length", "8", "--cuda-graphs",
               "off", "--attention", "wgmma", "--vocab-head", "wgmma", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["attention"] == "wgmma" and report["vocab_head"] == "wgmma"
    assert "DGEMMA_ATTENTION" not in os.environ and os.environ["DGEMMA_VOCAB_HEAD"] == "mma_sync"
    with pytest.raises(SystemExit) as e:
        main(["bench", "--attention", "fa3"])
    assert e.value.code == 2


def test_ncu_hot_lines_ranks_sass_by_stall_samples(tmp_path, capsys):
    """bench/ncu_hot_lines.py (device_check's profile stage) ranks an ncu source page's SASS lines by their stall
    samples and sums them per opcode; a file without that table is echoed, an unreadable one is one error line."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "ncu_hot_lines.py"
    spec = importlib.util.spec_from_file_location("ncu_hot_lines", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    page = tmp_path / "page.csv"
    page.write_text('"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed"\n'
                    '"0x10","HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;","10","4"\n'
                    '"0x20","@!P0 MUFU.EX2 R1, R2 ;","70","8"\n'
                    '"0x30","MUFU.RCP R3, R4 ;","1,020","8"\n'
                    '"0x40","IMAD.WIDE.U32 R4, R5, 3, RZ ;","0","8"\n')
    assert tool.main([str(page), "--top", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("4 SASS lines, 1,100 samples")
    mufu = next(line for line in out if line.strip().endswith("MUFU") and "%" in line)
    assert mufu.strip().startswith("99.09%")  # 1,090 of 1,100: the predicate is not the opcode
    hot = out[out.index("the 2 hottest lines (share, address, SASS):") + 1:]
    assert [line.split()[1] for line in hot] == ["0x30", "0x20"]
    raw = tmp_path / "raw.csv"
    raw.write_text("==ERR== the report could not be imported\n")
    assert tool.main([str(raw)]) == 0
    assert "no stall-sampling table found" in capsys.readouterr().out
    assert tool.main([str(tmp_path / "missing.csv")]) == 1
    assert capsys.readouterr().err.startswith("ncu_hot_lines: cannot read")


def test_kernel_bench_results_record_the_runs_kernel_settings(tmp_path, monkeypatch):
    """bench/*.py result files name every DGEMMA_* setting of their run (a variant's file is told apart by it, not
    by its name alone)."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[1] / "bench"
    monkeypatch.syspath_prepend(str(bench_dir))
    spec = importlib.util.spec_from_file_location("bench_common_under_test", bench_dir / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    monkeypatch.setenv("DGEMMA_ATTENTION_STAGES", "3")
    monkeypatch.setenv("DGEMMA_COMMIT", "abc123")
    monkeypatch.delenv("DGEMMA_DENSE_CLUSTER", raising=False)
    monkeypatch.setattr(sys, "argv", ["bench_attention.py", "--out", "x.json"])
    out = tmp_path / "r.json"
    common.write_results(str(out), [{"name": "row", "median_ms": 1.0}])
    doc = json.loads(out.read_text())
    settings = doc["kernel_settings"]
    assert settings["DGEMMA_ATTENTION_STAGES"] == "3" and "DGEMMA_DENSE_CLUSTER" not in settings
    assert doc["commit"] == "abc123" and doc["results"][0]["name"] == "row"


def test_device_check_runs_the_sanitizers_side_by_side_over_every_kernel_test_file(tmp_path):
    """device_check.sh's sanitize stage: every tool over every kernel test file (the tools concurrently), each run's
    command, exit status and summary line in the log, grouped per tool in a fixed order whatever finishes first."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    fake = tmp_path / "compute-sanitizer"
    # A stand-in sanitizer: racecheck is slow (it finishes last), and one file has an error under memcheck.
    # Its first report is kept whole though 40 lines of backtrace follow it (the summary alone would hide its kind).
    fake.write_text('#!/usr/bin/env bash\ntool=$2; f="${@: -1}"\n[[ $tool == racecheck ]] && sleep 1\n'
                    'n=0; [[ $tool == memcheck && $f == tests/b.py ]] && n=3\n'
                    'echo "ran $tool on $f"\n'
                    'if [[ $n != 0 ]]; then echo "========= Invalid __global__ read of size 4 bytes"\n'
                    'echo "=========     at bad_kernel+0x70"; for i in $(seq 40); do echo "=========   Host Frame: f$i"; '
                    'done; fi\necho "========= ERROR SUMMARY: $n errors"\n'
                    '[[ $n == 0 ]] || exit 9\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, STAGES="sanitize", OUT=str(out), SANITIZER=str(fake), KERNEL_TESTS="tests/a.py tests/b.py",
               TOOLS="racecheck memcheck", PYTHON="python3")
    done = subprocess.run(["bash", str(root / "bench" / "device_check.sh")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    log = (out / "device_check.log").read_text()
    summary = [line for line in log.splitlines() if line.startswith(("racecheck tests/", "memcheck tests/"))]
    assert summary[-4:] == ["racecheck tests/a.py: ========= ERROR SUMMARY: 0 errors",
                            "racecheck tests/b.py: ========= ERROR SUMMARY: 0 errors",
                            "memcheck tests/a.py: ========= ERROR SUMMARY: 0 errors",
                            "memcheck tests/b.py: ========= ERROR SUMMARY: 3 errors"]
    assert "-> exit 9 " in log and log.index("ran racecheck on tests/a.py") < log.index("ran memcheck on tests/a.py")
    assert "--tool memcheck --error-exitcode 9" in log and not list(out.glob("sanitize_*"))
    assert "Invalid __global__ read of size 4 bytes" in log and "at bad_kernel+0x70" in log
