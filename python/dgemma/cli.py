"""The ``dgemma`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from .errors import DgemmaError


def _demo(args: argparse.Namespace) -> int:
    import torch

    from .loading import load
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


def _load(args: argparse.Namespace):
    import torch

    from .loading import load

    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    quantization = None if args.quantization == "none" else args.quantization
    return load(args.model, device=args.device, dtype=dtype, quantization=quantization)


def _gen_kwargs(args: argparse.Namespace) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "max_denoising_steps": args.steps, "seed": args.seed}


class _DraftPrinter:
    """Shows the argmax canvas resolving: rewritten in place on a terminal, one line per step otherwise."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tok, self.out = tokenizer, out
        self.tty = out.isatty()

    def __call__(self, event) -> None:
        if event.kind != "draft":
            return
        text = self.tok.decode(event.tokens[0].tolist(), skip_special_tokens=True).replace("\n", " ")
        if self.tty:
            self.out.write(f"\x1b[2K\r[block {event.block} step {event.step:>2}] {text[:200]}")
            self.out.flush()
        else:
            print(f"[block {event.block} step {event.step}] {text}", file=self.out)

    def done(self) -> None:
        if self.tty:
            self.out.write("\x1b[2K\r")


def _print_reply(result, show_thinking: bool = True) -> None:
    if show_thinking and result.thinking:
        print(f"[thinking] {result.thinking}")
    for call in result.tool_calls:
        print(f"[tool call] {json.dumps(call)}")
    print(result.text)


def _user_turn(text: str, images: list[str]) -> dict:
    """A user message: the images (content parts, in order) before the text, as the model card advises."""
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image", "image": p} for p in images] + [{"type": "text", "text": text}]}


def _check_images(paths: list[str]) -> None:
    for p in paths:
        if not os.path.isfile(p):
            raise DgemmaError(f"--image {p}: no such file")


def _generate(args: argparse.Namespace) -> int:
    if not args.prompt:
        raise DgemmaError("--prompt is empty")
    _check_images(args.image)
    eng = _load(args)
    printer = _DraftPrinter(eng.tokenizer) if args.show_drafts else None
    chat = args.chat or args.thinking or args.image
    inputs = [_user_turn(args.prompt, args.image)] if chat else args.prompt
    result = eng.generate(inputs, thinking=args.thinking, stream=printer, max_image_tokens=args.image_tokens,
                          **_gen_kwargs(args))
    if printer is not None:
        printer.done()
    _print_reply(result)
    steps = sum(max(block) for block in result.steps_per_block)
    print(f"[{result.new_tokens.shape[1]} tokens in {len(result.steps_per_block)} blocks, {steps} denoising "
          f"steps, {result.timings['total_s']:.2f} s]", file=sys.stderr)
    return 0


def _chat(args: argparse.Namespace) -> int:
    eng = _load(args)
    session = eng.chat(system=args.system, thinking=args.thinking)
    printer = _DraftPrinter(eng.tokenizer) if args.show_drafts else None
    print("dgemma chat: type a message; /image PATH attaches an image to the next one; /reset starts over, "
          "/exit or Ctrl-D quits.", file=sys.stderr)
    images: list[str] = list(args.image)
    _check_images(images)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            return 0
        if line == "/reset":
            session = eng.chat(system=args.system, thinking=args.thinking)
            images = []
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            if not os.path.isfile(path):
                print(f"dgemma: error: /image {path}: no such file", file=sys.stderr)
            else:
                images.append(path)
            continue
        try:
            result = session.send(_user_turn(line, images), stream=printer, max_image_tokens=args.image_tokens,
                                  **_gen_kwargs(args))
        except DgemmaError as e:  # a bad turn leaves the session usable
            print(f"dgemma: error: {e}", file=sys.stderr)
            continue
        images = []
        if printer is not None:
            printer.done()
        _print_reply(result)


def _int_list(s: str) -> list[int]:
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {s!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {s!r}")
    return vals


def _bench(args: argparse.Namespace) -> int:
    from .bench import BenchOptions, print_table, run, save_plot

    opts = BenchOptions(preset=args.preset, device=args.device, dtype=args.precision, batch_sizes=args.batch,
                        prompt_length=args.prompt_length, steps=args.steps, iters=args.iters,
                        warmup=args.warmup, baseline=args.baseline, prefix_lengths=args.prefix_lengths or [],
                        seed=args.seed)
    report = run(opts, log=lambda m: print(m, file=sys.stderr))
    print_table(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        save_plot(report, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, safetensors, tokenizer)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weights/activations dtype (default: the checkpoint's)")
    p.add_argument("--quantization", default="none", choices=["none", "fp8"],
                   help="fp8: FP8 E4M3 attention, MLP and expert weights, quantised while loading (default: none)")
    p.add_argument("--thinking", action="store_true", help="let the model reason first (chat template's <|think|>)")
    p.add_argument("--max-new-tokens", type=_positive, default=None,
                   help="token budget, rounded up to whole canvases (default: generation_config.json or 256)")
    p.add_argument("--steps", type=_positive, default=None,
                   help="maximum denoising steps per canvas (default: generation_config.json or 48)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible output")
    p.add_argument("--show-drafts", action="store_true", help="show the canvas after every denoising step")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image for the (first) user turn; repeatable, in order (needs a checkpoint with a vision "
                        "tower)")
    p.add_argument("--image-tokens", type=int, default=280, choices=[70, 140, 280, 560, 1120],
                   help="soft tokens per image at most (default: 280)")


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line on stderr and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog="dgemma", description="Fast inference for DiffusionGemma.")
    p.add_argument("--version", action="version", version=f"dgemma {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    d = sub.add_parser("demo", help="write a tiny random checkpoint, encode a prompt and denoise a canvas")
    d.add_argument("--preset", default="tiny", choices=["tiny"], help="model preset (default: tiny)")
    d.add_argument("--seed", type=int, default=0, help="seed for weights, prompt and canvas (default: 0)")
    d.add_argument("--prompt-length", type=_positive, default=24, help="prompt tokens (default: 24)")
    d.add_argument("--canvas", type=_positive, default=32, help="canvas tokens (default: 32)")
    d.add_argument("--steps", type=_positive, default=8, help="at most this many denoising steps (default: 8)")
    d.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    d.set_defaults(func=_demo)

    g = sub.add_parser("generate", help="generate from a prompt")
    _add_model_options(g)
    g.add_argument("--prompt", required=True, help="the prompt text")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    g.set_defaults(func=_generate)

    c = sub.add_parser("chat", help="interactive multi-turn chat (reuses the KV cache across turns)")
    _add_model_options(c)
    c.add_argument("--system", default=None, help="system prompt")
    c.set_defaults(func=_chat)

    b = sub.add_parser("bench", help="benchmark denoising steps, blocks and prefill on random weights",
                       description="Times a denoising step, 256-token blocks at 16 and 48 steps (with the commit "
                                   "pass), prefill and time to first draft, each beside its HBM roofline. "
                                   "Default: the 26B-A4B shapes on a GPU, a small preset on a CPU.")
    b.add_argument("--preset", default="auto", choices=["auto", "tiny", "26b-a4b"],
                   help="model shapes (default: 26b-a4b on a GPU, tiny on a CPU)")
    b.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    b.add_argument("--precision", default="bfloat16", choices=["fp8", "bfloat16", "float32"],
                   help="fp8: FP8 projections and experts with bf16 activations (default: bfloat16)")
    b.add_argument("--batch", type=_int_list, default=[1], help="comma-separated batch sizes (default: 1)")
    b.add_argument("--prompt-length", type=_positive, default=None,
                   help="prompt tokens before the canvas (default: 1024 on 26b-a4b, 64 on tiny)")
    b.add_argument("--steps", type=_int_list, default=[16, 48], help="denoising steps per block (default: 16,48)")
    b.add_argument("--prefix-lengths", type=_int_list, default=None,
                   help="also time a step after these prefix lengths (for --plot)")
    b.add_argument("--iters", type=_positive, default=20, help="timed repetitions (default: 20)")
    b.add_argument("--warmup", type=_positive, default=3, help="warm-up repetitions (default: 3)")
    b.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default: 0)")
    b.add_argument("--baseline", choices=["transformers"], default=None,
                   help="also time transformers' model on the same weights and report the speed-up")
    b.add_argument("--json", default=None, help="write the results to this JSON file")
    b.add_argument("--plot", default=None, help="write a PNG: latency vs batch and vs prefix length, with roofline")
    b.set_defaults(func=_bench)
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
    except BrokenPipeError:
        return 0
    except (DgemmaError, OSError) as e:
        print(f"dgemma: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dgemma: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
