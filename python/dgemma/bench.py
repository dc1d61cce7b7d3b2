"""``dgemma bench``: denoising-step latency, block throughput and prefill on random weights.

On a GPU the default is the real 26B-A4B shapes; on a CPU-only machine a small preset, so the command
always runs. Steps and blocks run through the same sampler and block loop as ``generate``. Every time is
printed beside its memory roofline: the bytes it must move over the device's copy bandwidth, measured
at the start of the same run. On a GPU each step row also carries what a profile of one step shows:
kernel launches, host synchronisations and GPU-busy time.
"""

from __future__ import annotations

import os
import platform
import resource
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from .errors import DgemmaError
from .generation import denoise_block
from .ops.cuda_attention import attention_impl
from .ops.cuda_vocab_head import head_impl
from .sampler import GenerationSettings, make_sampler
from .steps import graphs_supported, make_stepper



@dataclass(slots=True)
class BenchOptions:
    preset: str = "auto"
    device: str = "auto"
    dtype: str = "bfloat16"
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    prompt_length: int | None = None
    steps: list[int] = field(default_factory=lambda: [16, 48])
    iters: int = 20
    warmup: int = 3
    baseline: str | None = None
    prefix_lengths: list[int] = field(default_factory=list)
    seed: int = 0
    cuda_graphs: str = "auto"  # "off", "on", "both" or "auto" (both where the step can be captured, else off)
    # More prompt lengths to time prefill at; None: PREFILL_LENGTHS of the preset (the 4096-token row of the bars).
    prefill_lengths: list[int] | None = None


def _timer(device: torch.device):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def measure(fn, iters: int, warmup: int) -> list[float]:
        for _ in range(warmup):
            fn()
        sync()
        out = []
        for _ in range(iters):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    return measure


def copy_bandwidth(device: torch.device, nbytes: int | None = None, iters: int = 10) -> tuple[float, list[float]]:
    """(bytes per second, copy times in ms) of a device-to-device copy of an ``nbytes`` buffer (default:
    1 GiB on a GPU, 64 MiB on a CPU), each byte read once and written once; the rate is the best copy's."""
    nbytes = nbytes or (2**30 if device.type == "cuda" else 2**26)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    times = _timer(device)(lambda: dst.copy_(src), iters, 2)
    return 2 * nbytes / (min(times) / 1e3), times


# Runtime calls after which the host waits for the device (a blocking copy, .item(), .tolist(), bool()).
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


TOP_KERNELS = 15

# Environment variables that pick kernel variants inside the extension (read once per process), recorded in the JSON.
KERNEL_SETTINGS = ("DGEMMA_VOCAB_HEAD_STATS", "DGEMMA_VOCAB_HEAD_SOFT", "DGEMMA_DENSE_SCHEDULE", "DGEMMA_DENSE_CLUSTER",
                   "DGEMMA_MOE_TILE", "DGEMMA_ROUTE_TILE", "DGEMMA_ATTENTION_PINGPONG", "DGEMMA_ATTENTION_STAGES",
                   "DGEMMA_DISABLE_KERNELS", "DGEMMA_STOP_ON_DEVICE", "DGEMMA_RESIDUAL_KERNEL")

# The prefill lengths timed besides the prompt's when --prefill-lengths is not given, per preset.
PREFILL_LENGTHS = {"26b-a4b": [4096]}


def summarise_profile(events) -> dict:
    """Kernels, host synchronisations and GPU-busy time (the union of kernel intervals, ms) of profiler
    events (``torch.profiler``'s ``events()``: ``name``, ``device_type``, ``time_range``), and ``top_kernels``:
    the kernels taking the most time, by name (at most 15: name, launches, total ms), where a step's time goes."""
    from torch.autograd import DeviceType

    cuda = [e for e in events if e.device_type == DeviceType.CUDA]
    kernels = sorted((e.time_range.start, e.time_range.end) for e in cuda)
    busy, end = 0.0, float("-inf")
    for start, stop in kernels:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    syncs = sum(1 for e in events if e.device_type == DeviceType.CPU and e.name in SYNC_CALLS)
    by_name: dict[str, list[float]] = {}
    for e in cuda:
        entry = by_name.setdefault(e.name, [0, 0.0])
        entry[0] += 1
        entry[1] += e.time_range.end - e.time_range.start
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:TOP_KERNELS]
    return {"kernels": len(kernels), "host_syncs": syncs, "gpu_busy_ms": busy / 1e3,
            "top_kernels": [{"name": name[:160], "launches": n, "total_ms": t / 1e3} for name, (n, t) in top]}


def profile(fn, device: torch.device) -> dict:
    """:func:`summarise_profile` of one call of ``fn`` (after one warm-up call); {} without a GPU."""
    if device.type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    torch.cuda.synchronize(device)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    summary = summarise_profile(prof.events())
    summary["host_syncs"] = max(0, summary["host_syncs"] - 1)  # the synchronize above is ours
    return summary


def step_bytes(eng, batch: int, prefix: int) -> float:
    """Bytes one denoising step must move: every weight it touches once, the vocabulary head's two
    reads of the embedding, and the K/V it attends to."""
    cfg, w = eng.config, eng.model.w
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    total = 0.0
    tokens = batch * cfg.canvas_length
    # Experts touched: all of them once tokens * top_k far exceeds the expert count.
    hit = cfg.num_experts * (1 - (1 - 1 / cfg.num_experts) ** (tokens * cfg.top_k))
    for spec, lw in zip(cfg.layers, w.layers):
        a = lw.attn
        total += sum(size(t) for t in (a.q_proj, a.k_proj, a.v_proj, a.o_proj) if t is not None)
        dense = (lw.shared_experts.gate_up, lw.shared_experts.down) if lw.shared_experts is not None \
            else (lw.mlp_gate, lw.mlp_up, lw.mlp_down)
        total += sum(size(t) for t in dense) + size(lw.router_proj)
        total += (size(lw.experts_gate_up) + size(lw.experts_down)) * hit / cfg.num_experts
        kv = min(prefix, spec.window - 1) if spec.is_sliding else prefix
        total += 2 * batch * kv * spec.num_kv_heads * spec.head_dim * w.embed.element_size()
    total += 2 * size(w.embed)  # lm_head and the self-conditioning soft embedding
    total += size(w.sc_gate) + size(w.sc_up) + size(w.sc_down)
    return total


def _memory_peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _row(name: str, times: list[float] | float, roofline_ms: float | None = None, **extra) -> dict:
    med = statistics.median(times) if isinstance(times, list) else times
    row = {"name": name, "median_ms": med}
    if roofline_ms is not None:
        row["roofline_ms"] = roofline_ms
        row["roofline_share"] = roofline_ms / med if med > 0 else float("nan")
    row.update(extra)
    return row


def preset_and_prompt(preset: str, prompt_length: int | None, device: torch.device) -> tuple[str, int]:
    """The preset a run uses ("auto": 26b-a4b on a GPU, tiny on a CPU) and its prompt length (default 1024 for
    26b-a4b, 64 otherwise)."""
    if preset == "auto":
        preset = "26b-a4b" if device.type == "cuda" else "tiny"
    return preset, prompt_length or (1024 if preset == "26b-a4b" else 64)


def run(opts: BenchOptions, *, log=print) -> dict:
    from .random_checkpoint import random_engine

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if opts.device == "auto" else opts.device)
    preset, prompt_len = preset_and_prompt(opts.preset, opts.prompt_length, device)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "fp8": torch.bfloat16}.get(opts.dtype)
    if dtype is None:
        raise DgemmaError(f"precision {opts.dtype!r} is not supported (expected fp8, bfloat16 or float32)")
    quantization = "fp8" if opts.dtype == "fp8" else None
    log(f"dgemma bench: preset {preset}, {opts.dtype}, device {device}, prompt {prompt_len}, "
        f"batches {opts.batch_sizes}, steps {opts.steps}")
    if preset == "26b-a4b" and device.type == "cpu":
        raise DgemmaError("the 26b-a4b preset needs a GPU (its bf16 weights are 50 GB); use --preset tiny")
    from . import _ext

    measure = _timer(device)
    bandwidth, copy_ms = copy_bandwidth(device)
    results = [_row("copy_bandwidth", copy_ms, gb_per_s=bandwidth / 1e9)]
    log(f"copy bandwidth {bandwidth / 1e9:,.0f} GB/s (the roofline's denominator)")
    # transformers first, on its own bf16 weights, then freed: the two models never share the GPU.
    baseline = _baseline_transformers(opts, preset, prompt_len, device, measure) if opts.baseline else {}
    backend = "cuda" if device.type == "cuda" and _ext.cuda_status() is None else "reference"
    eng = random_engine(preset, seed=opts.seed, dtype=dtype, device=device, progress=True, backend=backend,
                        quantization=quantization)
    cfg = eng.config
    c, v = cfg.canvas_length, cfg.vocab_size
    g = torch.Generator(device=device).manual_seed(opts.seed)
    settings = GenerationSettings(max_denoising_steps=max(opts.steps))
    roof = lambda nbytes: nbytes / bandwidth * 1e3  # noqa: E731  (ms)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    modes = _graph_modes(opts.cuda_graphs, eng, log)

    for b in opts.batch_sizes:
        prompt = torch.randint(3, v, (b, prompt_len), generator=g, device=device)
        prefill = measure(lambda: eng.encode(prompt, capacity=prompt_len + c), max(3, opts.iters // 4), 1)
        enc_bytes = step_bytes(eng, 1, 0) - 2 * eng.model.w.embed.numel() * eng.model.w.embed.element_size()
        results.append(_row(f"prefill_t{prompt_len}_{opts.dtype}_b{b}", prefill, roof(enc_bytes)))
        for t in (opts.prefill_lengths if opts.prefill_lengths is not None else PREFILL_LENGTHS.get(preset, [])):
            if t == prompt_len or t > cfg.max_position_embeddings - c:
                continue
            longer = torch.randint(3, v, (b, t), generator=g, device=device)
            ms = measure(lambda longer=longer, t=t: eng.encode(longer, capacity=t + c), max(3, opts.iters // 4), 1)
            results.append(_row(f"prefill_t{t}_{opts.dtype}_b{b}", ms, roof(enc_bytes), tokens=t,
                                tok_per_s=b * t / (statistics.median(ms) / 1e3)))
            del longer
        cache = eng.new_cache(b, prompt_len + c, rollback=c)
        eng.encode(prompt, cache=cache)
        canvas = torch.randint(0, v, (b, c), generator=g, device=device)
        sc = torch.randn(b, c, v, generator=g, device=device).to(dtype)
        step_roof = roof(step_bytes(eng, b, prompt_len))

        # Steps and blocks run through generate's own sampler, stepper and block loop (the fused head on CUDA),
        # without and/or with CUDA graphs (rows ``*_graphs_*``).
        soft = eng.model.soft_input(sc)
        running = torch.zeros(b, dtype=torch.bool, device=device)
        for graphs in modes:
            eng.cuda_graphs = graphs
            tag = f"{opts.dtype}_graphs" if graphs else opts.dtype
            sampler = make_sampler(eng, settings, g)
            stepper = make_stepper(eng, cache, sampler)

            def one_step(soft=soft, n=settings.max_denoising_steps, stepper=stepper):
                return stepper(canvas, soft, n, running)

            step = measure(one_step, opts.iters, opts.warmup)
            results.append(_row(f"denoise_step_{tag}_b{b}", step, step_roof, batch=b, prefix=prompt_len,
                                bytes=step_bytes(eng, b, prompt_len), **profile(one_step, device)))
            if b in baseline and not graphs:
                hf_ms = statistics.median(baseline[b])
                results.append(_row(f"transformers_step_bf16_b{b}", hf_ms, step_roof, batch=b,
                                    dgemma_ms=statistics.median(step), ratio=hf_ms / statistics.median(step)))
            if not graphs:
                forward = measure(lambda: eng.denoise(cache, canvas, sc), opts.iters, opts.warmup)
                results.append(_row(f"decoder_forward_{opts.dtype}_b{b}", forward, step_roof, batch=b))
            first = measure(lambda: one_step(None), max(3, opts.iters // 4), 1)
            results.append(_row(f"first_draft_{tag}_b{b}", first, step_roof))
            for n in opts.steps:
                # Exactly n steps: a confidence bound no canvas reaches disables early stopping.
                fixed = settings.updated(max_denoising_steps=n, confidence_threshold=1e-30)

                def block(fixed=fixed):
                    # The steps and the commit pass through generate's stepper (graph-replayed in *_graphs_*).
                    denoise_block(eng, cache, canvas, fixed, make_sampler(eng, fixed, g), commit=True)
                    cache.truncate(prompt_len)

                ms = measure(block, max(2, opts.iters // 8), 1)
                tok_s = b * c / (statistics.median(ms) / 1e3)
                # Per step, the commit pass included (the kernel breakdown is the step rows').
                prof = {k: v / n for k, v in profile(block, device).items() if k != "top_kernels"}
                results.append(_row(f"block{n}_{tag}_b{b}", ms, step_roof * n, tok_per_s=tok_s, steps=n,
                                    **{f"{k}_per_step": v for k, v in prof.items()}))
        eng.cuda_graphs = False
        if b > 1:
            # The server's batched step: b requests, each with its own batch-1 cache (prefixes of different
            # lengths), in one decoder pass, against b passes one request at a time.
            caches = []
            for r in range(b):
                cr = eng.new_cache(1, prompt_len + c)
                eng.encode(prompt[r:r + 1, :max(1, prompt_len - 7 * r)], cache=cr)
                caches.append(cr)
            softs = [soft[r:r + 1] for r in range(b)]
            rows = measure(lambda: eng.model.denoise_hidden_rows(canvas, caches, softs, check_ids=False), opts.iters, opts.warmup)
            each = measure(lambda: [eng.model.denoise_hidden(canvas[r:r + 1], caches[r], softs[r])
                                    for r in range(b)], max(3, opts.iters // 4), 1)
            results.append(_row(f"server_decoder_pass_{opts.dtype}_b{b}", rows, step_roof, batch=b,
                                one_at_a_time_ms=statistics.median(each),
                                speedup=statistics.median(each) / statistics.median(rows)))
            del caches
        for prefix in opts.prefix_lengths:
            pc = eng.encode(torch.randint(3, v, (b, prefix), generator=g, device=device), capacity=prefix + c)
            t = measure(lambda pc=pc: eng.denoise(pc, canvas, sc), max(3, opts.iters // 4), 1)
            results.append(_row(f"denoise_step_{opts.dtype}_b{b}_p{prefix}", t,
                                roof(step_bytes(eng, b, prefix)), batch=b, prefix=prefix))

    results.append({"name": "peak_memory", "median_ms": 0.0, "peak_mib": _memory_peak_mib(device)})
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "torch": torch.__version__, "cuda": torch.version.cuda, "commit": os.environ.get("DGEMMA_COMMIT", "unknown"),
        "command": shlex.join(["dgemma"] + sys.argv[1:]), "preset": preset, "backend": eng.backend,
        # Programmatic dependent launch of dgemma's kernels (csrc/kernels/pdl.cuh), read once by the extension.
        "pdl": os.environ.get("DGEMMA_PDL", "") == "1",
        # The fused vocabulary head's GEMMs (DGEMMA_VOCAB_HEAD, ops/cuda_vocab_head.py).
        "vocab_head": head_impl(),
        # The attention kernel (DGEMMA_ATTENTION, ops/cuda_attention.py).
        "attention": attention_impl(),
        # The kernel variants the extension reads once per process (see the README): "" where unset (the default).
        "kernel_settings": {name: os.environ.get(name, "") for name in KERNEL_SETTINGS},
        "results": results,
    }


def _graph_modes(choice: str, eng, log) -> list[bool]:
    """Which of eager (False) and CUDA-graph (True) steps to time."""
    if choice not in ("auto", "off", "on", "both"):
        raise DgemmaError(f"cuda_graphs {choice!r} is not one of auto, off, on, both")
    why = graphs_supported(eng)
    if choice in ("on", "both") and why is not None:
        raise DgemmaError(f"--cuda-graphs {choice}: this step cannot be captured ({why})")
    if choice == "auto":
        choice = "off" if why is not None else "both"
    if choice != "off":
        log(f"CUDA graphs: {choice}")
    return {"off": [False], "on": [True], "both": [False, True]}[choice]


def _baseline_transformers(opts, preset, prompt_len, device, measure) -> dict[int, list[float]]:
    """transformers' bf16 model at the preset's shapes: one denoising step per batch size (the decoder
    forward with self-conditioning logits, then the sampler's softmax, multinomial, entropy and acceptance
    as its ``generate`` runs them), timed in this process. Built on the meta device and given random bf16
    tensors without copies; everything is freed before dgemma's engine is built."""
    try:
        from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    except ImportError:
        raise DgemmaError("--baseline transformers needs transformers==5.23.0 (pip install 'dgemma[test]')") from None
    from .config import ModelConfig
    from .random_checkpoint import preset_config, random_tensors
    from .sampler import reference_sample_step, temperature

    raw = preset_config(preset)
    cfg = ModelConfig.from_dict(raw)
    text = dict(raw["text_config"])
    text.pop("model_type", None)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=8)
    hf_cfg = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=cfg.canvas_length)
    with torch.device("meta"):
        hf = DiffusionGemmaForBlockDiffusion(hf_cfg).to(torch.bfloat16)
    state = random_tensors(cfg, seed=opts.seed, dtype=torch.bfloat16, device=device)
    # The vision tower's tiny weights are the only ones the text checkpoint lacks.
    for name, t in hf.state_dict().items():
        if name not in state and "vision" in name:
            state[name] = torch.zeros(t.shape, dtype=t.dtype, device=device)
    missing = hf.load_state_dict(state, strict=False, assign=True).missing_keys
    untied = [k for k in missing if not k.startswith(("model.encoder.language_model", "lm_head"))]
    if untied:
        raise DgemmaError(f"baseline model has weights dgemma did not provide: {untied[:3]}")
    hf.tie_weights()
    _materialise_buffers(hf, device)
    hf.eval()
    c, v = cfg.canvas_length, cfg.vocab_size
    g = torch.Generator(device=device).manual_seed(opts.seed)
    settings = GenerationSettings(max_denoising_steps=max(opts.steps))
    temp = temperature(settings.max_denoising_steps, settings, device)
    times = {}
    with torch.no_grad():
        for b in opts.batch_sizes:
            prompt = torch.randint(3, v, (b, prompt_len), generator=g, device=device)
            canvas = torch.randint(0, v, (b, c), generator=g, device=device)
            past = hf(input_ids=prompt, decoder_input_ids=canvas).past_key_values
            sc = torch.randn(b, c, v, generator=g, device=device).to(torch.bfloat16)

            def step(past=past, canvas=canvas, sc=sc, model=hf):
                logits = model(past_key_values=past, decoder_input_ids=canvas, self_conditioning_logits=sc).logits
                return reference_sample_step(logits.float(), canvas, temp, settings.entropy_bound, g)

            times[b] = measure(step, max(3, opts.iters // 4), 1)
            del past, sc
    del hf, state
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return times


def _materialise_buffers(model, device: torch.device) -> None:
    """Give the buffers a meta-device model still lacks after its weights were assigned their values:
    rotary tables (recomputed by the model's own initialiser), embedding scales and layer scalars."""
    for path, module in model.named_modules():
        meta = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        for name in meta:
            b = module._buffers[name]
            module._buffers[name] = torch.zeros(b.shape, dtype=b.dtype, device=device)
        if not meta or "vision" in path:  # the vision tower never runs on text input: zeros will do
            continue
        if type(module).__name__.endswith("RotaryEmbedding"):
            model._init_weights(module)
        elif hasattr(module, "scalar_embed_scale"):
            module.embed_scale.fill_(module.scalar_embed_scale)
        elif meta == ["layer_scalar"]:
            module.layer_scalar.fill_(1.0)
        else:
            raise DgemmaError(f"baseline model: no values for the buffers {meta} of {type(module).__name__}")
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise DgemmaError(f"baseline model: tensors left on the meta device: {left[:3]}")


def save_plot(report: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DgemmaError("--plot needs matplotlib (pip install matplotlib)") from None
    steps = [r for r in report["results"] if r["name"].startswith("denoise_step_") and "batch" in r]
    # One line per way of running the step (eager, CUDA graphs); the prefix sweep at the smallest batch measured.
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "batch", "batch size"), (axes[1], "prefix", "prefix length (tokens)")):
        drawn = False
        for graphs in (False, True):
            rows = [r for r in steps
                    if ("_graphs_" in r["name"]) == graphs and ("_p" in r["name"]) == (key == "prefix")]
            if key == "prefix" and rows:
                rows = [r for r in rows if r["batch"] == min(r["batch"] for r in rows)]
            rows = sorted(rows, key=lambda r: r[key])
            if not rows:
                continue
            xs = [r[key] for r in rows]
            ax.plot(xs, [r["median_ms"] for r in rows], "o-", label="dgemma, CUDA graphs" if graphs else "dgemma")
            if not drawn:
                ax.plot(xs, [r["roofline_ms"] for r in rows], "k--", label="HBM roofline")
            drawn = True
        ax.set_xlabel(label)
        ax.set_ylabel("denoising step (ms)")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "not measured" + (" (--prefix-lengths)" if key == "prefix" else ""),
                    ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"dgemma denoising step, {report['preset']} on {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
