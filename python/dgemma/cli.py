"""The ``dgemma`` command line."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from .errors import DgemmaError


def _demo(args: argparse.Namespace) -> int:
    import torch

    from .engine import load
    from .random_checkpoint import write_random_checkpoint

    with tempfile.TemporaryDirectory(prefix="dgemma-demo-") as tmp:
        print(f"writing a random '{args.preset}' checkpoint (seed {args.seed}) to {tmp}")
        write_random_checkpoint(tmp, args.preset, seed=args.seed, canvas_length=args.canvas)
        eng = load(tmp, device=args.device, dtype=torch.float32)
        print(eng)
        g = torch.Generator().manual_seed(args.seed)
        vocab = eng.config.vocab_size
        prompt = torch.randint(3, vocab, (1, args.prompt_length), generator=g)
        t0 = time.perf_counter()
        cache = eng.encode(prompt)
        t_enc = time.perf_counter() - t0
        canvas = torch.randint(0, vocab, (1, args.canvas), generator=g)
        logits, steps = None, 0
        t0 = time.perf_counter()
        for steps in range(1, args.steps + 1):
            logits = eng.denoise(cache, canvas, logits)
            draft = logits.argmax(-1)
            if torch.equal(draft, canvas):
                break
            canvas = draft
        t_den = time.perf_counter() - t0
        print(f"encoded {args.prompt_length} prompt tokens in {t_enc * 1e3:.1f} ms")
        print(f"denoised a {args.canvas}-token canvas: {steps} greedy steps, {t_den / steps * 1e3:.1f} ms/step")
        print("canvas ids:", canvas[0].tolist())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="dgemma", description="Fast inference for DiffusionGemma.")
    p.add_argument("--version", action="version", version=f"dgemma {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="write a tiny random checkpoint, encode a prompt and denoise a canvas")
    d.add_argument("--preset", default="tiny", choices=["tiny"], help="model preset (default: tiny)")
    d.add_argument("--seed", type=int, default=0, help="seed for weights, prompt and canvas (default: 0)")
    d.add_argument("--prompt-length", type=_positive, default=24, help="prompt tokens (default: 24)")
    d.add_argument("--canvas", type=_positive, default=32, help="canvas tokens (default: 32)")
    d.add_argument("--steps", type=_positive, default=8, help="at most this many denoising steps (default: 8)")
    d.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    d.set_defaults(func=_demo)
    return p


def _positive(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DgemmaError, OSError) as e:
        print(f"dgemma: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dgemma: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
