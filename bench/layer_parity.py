"""Where the CUDA engine departs from the reference backend, layer by layer.

Builds one set of random weights at a preset's shapes (FP8, as ``dgemma.load`` quantises them), a CUDA-backend
engine on them and reference-backend engines on the *same* tensors (bf16, and with ``--fp32`` an fp32 one whose
distance from the bf16 reference shows how far rounding alone moves the model), then reports per layer:

* encoder: the relative error of each layer's cached K and V (CUDA vs reference, each on its own prompt pass);
* decoder: the cosine similarity and relative error of each layer's output over the canvas, with the CUDA decoder
  reading its own cache and, separately, the reference's cache (which isolates the decoder from the encoder);
* head: the logits' cosine and argmax agreement, and the CUDA head on the reference's final hidden states.

Prints one table and writes JSON (``--json``). Usage (GPU)::

    python bench/layer_parity.py --preset 26b-a4b --prompt 1024 --json parity.json
    python bench/layer_parity.py --preset small --backend reference --device cpu   # the tool's own check
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
import torch.nn.functional as F


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64 (0 when both are zero)."""
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den else float((a - b).norm().item() != 0)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the cosine similarity of the last dimension."""
    a, b = a.reshape(-1, a.shape[-1]).float(), b.reshape(-1, b.shape[-1]).float()
    return F.cosine_similarity(a, b, dim=-1).mean().item()


def reference_engine(eng, dtype: torch.dtype):
    """A reference-backend engine on ``eng``'s tensors (FP8 weights shared; the others cast to ``dtype``)."""
    from dgemma.engine import Engine
    from dgemma.quant import Fp8Weight
    from dgemma.weights import ModelWeights, named_tensors

    tensors = {k: (v if isinstance(v, Fp8Weight) else v.to(dtype))
               for k, v in named_tensors(eng.config, eng.model.w).items()}
    return Engine(eng.config, ModelWeights.from_tensors(eng.config, tensors), device=eng.device, dtype=dtype,
                  backend="reference")


def decoder_states(eng, canvas: torch.Tensor, cache) -> list[torch.Tensor]:
    """The decoder input and every layer's output over ``canvas`` (fp32 copies), then the final-normed states."""
    model = eng.model
    states = [x.float().clone() for _, x in model._decoder_states(canvas, cache, None)]
    states.append(model.denoise_hidden(canvas, cache).float())
    return states


def compare_states(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> list[dict]:
    rows = []
    for i, (a, b) in enumerate(zip(ours, theirs)):
        name = "input" if i == 0 else ("final_norm" if i == len(ours) - 1 else f"layer{i - 1}")
        rows.append({"where": name, "cosine": cosine(a, b), "rel": rel(a, b)})
    return rows


def teacher_forced(eng, canvas: torch.Tensor, cache, states: list[torch.Tensor]) -> list[dict]:
    """Each of ``eng``'s decoder layers on another run's input to it (``states``: that run's decoder input, layer
    outputs, final states) and its cache: the per-layer error without the compounding of the layers before."""
    layers = len(states) - 2
    outs = eng.model.decoder_layer_outputs(canvas, cache, states[:layers])
    return [{"where": f"layer{i}", "cosine": cosine(o, states[i + 1]), "rel": rel(o.float(), states[i + 1])}
            for i, o in enumerate(outs)]


def cache_as(cache, dtype: torch.dtype):
    """A shallow copy of ``cache`` whose keys and values are cast to ``dtype``."""
    out = copy.copy(cache)
    out.keys, out.values, out.dtype = [k.to(dtype) for k in cache.keys], [v.to(dtype) for v in cache.values], dtype
    return out


def compare_caches(a, b) -> list[dict]:
    rows = []
    for layer in range(len(a.keys)):
        rows.append({"layer": layer, "k_rel": rel(a.keys[layer], b.keys[layer]),
                     "v_rel": rel(a.values[layer], b.values[layer])})
    return rows


def logits_report(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    v = ours.shape[-1]
    ours, theirs = ours.reshape(-1, v).float(), theirs.reshape(-1, v).float()
    return {"cosine": cosine(ours, theirs), "rel": rel(ours, theirs),
            "argmax_agreement": (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="26b-a4b")
    p.add_argument("--backend", default="cuda", help="the backend under test (default cuda)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quantization", default="fp8", help="fp8 (default) or none")
    p.add_argument("--prompt", type=int, default=1024, help="prompt tokens (default 1024)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--canvas", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp32", action="store_true", help="also an fp32 reference (the bf16 reference's own distance)")
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)
    for name in ("prompt", "batch", "canvas"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")

    from dgemma.random_checkpoint import random_engine

    t0 = time.time()
    quant = None if args.quantization == "none" else args.quantization
    eng = random_engine(args.preset, seed=args.seed, dtype=torch.bfloat16, device=args.device, backend=args.backend,
                        quantization=quant, canvas_length=args.canvas)
    refs = {"bf16": reference_engine(eng, torch.bfloat16)}
    if args.fp32:
        refs["fp32"] = reference_engine(eng, torch.float32)
    v = eng.config.vocab_size
    g = torch.Generator(device=args.device).manual_seed(args.seed + 1)
    ids = torch.randint(3, v, (args.batch, args.prompt), generator=g, device=args.device)
    canvas = torch.randint(0, v, (args.batch, args.canvas), generator=g, device=args.device)

    report: dict = {"preset": args.preset, "backend": args.backend, "quantization": args.quantization,
                    "prompt": args.prompt, "batch": args.batch, "canvas": args.canvas, "device": str(eng.device)}
    report.update(torch=torch.__version__, command=" ".join(["python", *sys.argv]),
                  commit=os.environ.get("DGEMMA_COMMIT", "unknown"))
    if eng.device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(eng.device)
    with torch.inference_mode():
        cache = eng.encode(ids, capacity=args.prompt)
        ref_caches = {k: r.encode(ids, capacity=args.prompt) for k, r in refs.items()}
        report["encoder"] = compare_caches(cache, ref_caches["bf16"])
        ours = decoder_states(eng, canvas, cache)
        ours_on_ref_cache = decoder_states(eng, canvas, ref_caches["bf16"])
        theirs = {k: decoder_states(r, canvas, ref_caches[k]) for k, r in refs.items()}
        report["decoder"] = compare_states(ours, theirs["bf16"])
        report["decoder_on_reference_cache"] = compare_states(ours_on_ref_cache, theirs["bf16"])
        report["decoder_teacher_forced"] = teacher_forced(eng, canvas, ref_caches["bf16"], theirs["bf16"])
        logits = eng.model.logits(ours[-1].to(torch.bfloat16))
        ref_logits = refs["bf16"].model.logits(theirs["bf16"][-1].to(torch.bfloat16))
        report["logits"] = logits_report(logits, ref_logits)
        report["head_on_reference_states"] = logits_report(
            eng.model.logits(theirs["bf16"][-1].to(torch.bfloat16)), ref_logits)
        del logits
        if "fp32" in refs:
            report["reference_bf16_vs_fp32"] = {
                "encoder": compare_caches(ref_caches["bf16"], ref_caches["fp32"]),
                "decoder": compare_states(theirs["bf16"], theirs["fp32"]),
                "logits": logits_report(ref_logits, refs["fp32"].model.logits(theirs["fp32"][-1])),
                "decoder_teacher_forced": teacher_forced(refs["bf16"], canvas,
                                                         cache_as(ref_caches["fp32"], torch.bfloat16), theirs["fp32"]),
            }
    report["seconds"] = round(time.time() - t0, 1)

    print(f"layer parity: {args.preset}, {args.backend} vs reference (bf16), prompt {args.prompt}, "
          f"batch {args.batch}, canvas {args.canvas}")
    print("dec: the decoder run freely; on-ref: on the reference's cache; forced: each layer on the reference's "
          "input to it (teacher forcing); enc: the encoder's cached K/V")
    print(f"{'where':<12} {'dec cos':>9} {'dec rel':>9} {'on-ref cos':>10} {'on-ref rel':>10} {'forced cos':>10} "
          f"{'forced rel':>10} {'enc k rel':>9} {'enc v rel':>9}")
    enc = {r["layer"]: r for r in report["encoder"]}
    forced = {r["where"]: r for r in report["decoder_teacher_forced"]}
    for i, (d, dr) in enumerate(zip(report["decoder"], report["decoder_on_reference_cache"])):
        e, t = enc.get(i - 1), forced.get(d["where"])
        tf = f"{t['cosine']:10.5f} {t['rel']:10.4f}" if t else " " * 21
        ek = f"{e['k_rel']:9.4f} {e['v_rel']:9.4f}" if e else ""
        print(f"{d['where']:<12} {d['cosine']:9.5f} {d['rel']:9.4f} {dr['cosine']:10.5f} {dr['rel']:10.4f} {tf} {ek}")
    print("logits:", json.dumps(report["logits"]), " head on reference states:",
          json.dumps(report["head_on_reference_states"]))
    if "reference_bf16_vs_fp32" in report:
        r = report["reference_bf16_vs_fp32"]
        worst = min(r["decoder"], key=lambda d: d["cosine"])
        worst_forced = max(r["decoder_teacher_forced"], key=lambda d: d["rel"])
        print("reference bf16 vs fp32: logits", json.dumps(r["logits"]), " lowest decoder cosine",
              f"{worst['cosine']:.5f} at {worst['where']}; teacher-forced: largest rel {worst_forced['rel']:.4f} at "
              f"{worst_forced['where']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print("wrote", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
