"""The ``dgemma`` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import unicodedata

# Only the standard library and the torch-free errors module at import time: ``dgemma --help`` and usage
# errors must answer without loading torch or the compiled extension (over a second on a small machine).
from .errors import DgemmaError

SEED_MAX = 2**64 - 1  # torch generators take 64-bit seeds


def _check_save_dir(path: str) -> None:
    """``demo --save DIR``: a new or empty directory, or one holding only an earlier demo checkpoint."""
    from .demo import FILES

    if not path.strip():
        raise DgemmaError("--save '': expected a directory path")

    if os.path.exists(path) and not os.path.isdir(path):
        raise DgemmaError(f"--save {path}: exists and is not a directory")
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor):  # the directories made for it must go under a directory
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise DgemmaError(f"--save {path}: {ancestor} is not a directory")
    if os.path.isdir(path):
        others = sorted(set(os.listdir(path)) - set(FILES))
        if others:
            raise DgemmaError(f"--save {path}: directory is not empty (holds {others[0]!r}); choose a new one")


def _demo(args: argparse.Namespace) -> int:
    import tempfile
    import time

    import torch

    from .engine import resolve_device
    from .loading import load
    from .random_checkpoint import write_random_checkpoint

    resolve_device(args.device)
    if args.save is not None:
        _check_save_dir(args.save)
    with tempfile.TemporaryDirectory(prefix="dgemma-demo-") as tmp:
        if args.save is None:
            path = tmp
            print(f"writing a random '{args.preset}' checkpoint (seed {args.seed}) to {tmp}")
            write_random_checkpoint(tmp, args.preset, seed=args.seed, canvas_length=args.canvas)
        else:
            from .demo import write_demo_checkpoint

            path = args.save
            print(f"writing a random '{args.preset}' checkpoint with a tokenizer and a chat template "
                  f"(seed {args.seed}) to {path}")
            write_demo_checkpoint(path, seed=args.seed, canvas_length=args.canvas, max_denoising_steps=args.steps)
        eng = load(path, device=args.device, dtype=torch.float32)
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
    if args.save is not None:
        import shlex

        where = shlex.quote(args.save)
        print(f"canvas text: {eng.tokenizer.decode(canvas[0].tolist())!r}")
        print(f"\n{args.save} is a complete checkpoint (random weights, so the replies are random text). Try:\n"
              f"  dgemma generate --model {where} --prompt \"Hello\" --chat --show-drafts\n"
              f"  dgemma chat --model {where}")
    return 0


def _check_model(args: argparse.Namespace, *, chat: bool) -> None:
    """Refuse a --model that cannot serve the command before any weights are read: text in and out needs
    the checkpoint's tokenizer, chat input its chat template too."""
    from .chat import load_chat_template
    from .tokenizer import Tokenizer

    path = args.model
    if os.path.isfile(path):
        raise DgemmaError(f"--model {path} is a file: pass the checkpoint directory holding it "
                          f"({os.path.dirname(os.path.abspath(path))})")
    if not os.path.isdir(path):
        raise DgemmaError(f"--model: checkpoint directory not found: {path}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise DgemmaError(f"--model {path}: no config.json (expected a checkpoint directory in the Hugging Face "
                          f"layout)")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise DgemmaError(f"--model {path}: no tokenizer.json, so no text in or out; use a checkpoint with its "
                          f"tokenizer files (e.g. one written by `dgemma demo --save DIR`)")
    tok = Tokenizer(path)
    if chat and load_chat_template(path, tok.config) is None:
        raise DgemmaError(f"--model {path}: no chat template (chat_template.jinja or tokenizer_config.json's "
                          f"chat_template)")
    _check_images(args.image, "--image")
    _check_images(args.video, "--video")


def _load(args: argparse.Namespace):
    import torch

    from .loading import load

    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    quantization = None if args.quantization == "none" else args.quantization
    return load(args.model, device=args.device, dtype=dtype, quantization=quantization, cuda_graphs=args.cuda_graphs)


def _gen_kwargs(args: argparse.Namespace) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "max_denoising_steps": args.steps, "seed": args.seed}


_KEEP = {"\n", "\t"}


def _printable(text: str) -> str:
    """On a terminal, control characters in model output (e.g. an ESC from a byte-level token) would be
    interpreted by it; show them as U+FFFD instead. Pipes and files get the text unchanged."""
    return "".join("\ufffd" if unicodedata.category(ch) == "Cc" and ch not in _KEEP else ch for ch in text)


def _out(text: str, file=None) -> None:
    file = file or sys.stdout
    print(_printable(text) if file.isatty() else text, file=file)


class _DraftPrinter:
    """Shows the argmax canvas resolving: rewritten in place on a terminal, one line per step otherwise.

    Steps are numbered 1, 2, … within a block; the stream's own ``step`` counts the remaining passes
    down (N…1), and its first draft of a block carries N."""

    def __init__(self, tokenizer, out=None):
        self.tok, self.out = tokenizer, out or sys.stdout
        self.tty = self.out.isatty()
        self._block, self._first = None, 0

    def __call__(self, event) -> None:
        if getattr(event, "kind", None) != "draft":
            return
        if event.block != self._block:
            self._block, self._first = event.block, event.step
        n = self._first - event.step + 1
        text = self.tok.decode(event.tokens[0].tolist(), skip_special_tokens=True).replace("\n", " ")
        if self.tty:
            self.out.write(f"\x1b[2K\r[block {event.block} step {n:>2}] {_printable(text)[:200]}")
            self.out.flush()
        else:
            print(f"[block {event.block} step {n}] {text}", file=self.out)

    def done(self) -> None:
        if self.tty:
            self.out.write("\x1b[2K\r")


def _print_reply(result, show_thinking: bool = True) -> None:
    if show_thinking and result.thinking:
        _out(f"[thinking] {result.thinking}")
    for call in result.tool_calls:
        _out(f"[tool call] {json.dumps(call, ensure_ascii=False)}")
    _out(result.text if result.text is not None else "")


def _user_turn(text: str, images: list, videos: list = ()) -> dict:
    """A user message: the images and videos (content parts, in order) before the text, as the model card
    advises."""
    if not images and not videos:
        return {"role": "user", "content": text}
    parts = [{"type": "image", "image": p} for p in images] + [{"type": "video", "video": p} for p in videos]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def _check_images(paths: list[str], flag: str) -> None:
    for p in paths:
        _check_media(p, flag)


def _check_media(path: str, flag: str) -> None:
    """Refuse, naming it, an image (``--image``, ``/image``) or a video that cannot be read, when it is given
    rather than at the turn that sends it."""
    if not os.path.isfile(path):
        raise DgemmaError(f"{flag} {path}: no such file")
    from .vision_inputs import load_image, load_video

    try:
        if flag.endswith("image"):
            load_image(path)
        else:
            load_video(path, max_frames=1)
    except DgemmaError as e:
        raise DgemmaError(f"{flag} {path}: {_one_line(e)}") from None


def _read_media(path: str, flag: str, *, check: bool = True) -> bytes:
    """The bytes of an image or video attached in ``dgemma chat`` (checked unless ``check`` is False: _check_model
    has): the conversation keeps them, so later turns neither read the file again nor see it changed or gone."""
    if check:
        _check_media(path, flag)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DgemmaError(f"{flag} {path}: cannot be read ({e.strerror or e})") from None


def _clean_text(s: str | None) -> str | None:
    """Text from argv or stdin that was not valid UTF-8 arrives with surrogate escapes (or lone
    surrogates), which the tokenizer cannot encode: decode it again with U+FFFD for the bad bytes."""
    if s is None:
        return None
    try:
        raw = s.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = s.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "replace")


def _generate(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise DgemmaError("--prompt is empty")
    chat = args.chat or args.thinking or args.image or args.video
    _check_model(args, chat=bool(chat))
    eng = _load(args)
    printer = _DraftPrinter(eng.tokenizer) if args.show_drafts else None
    inputs = [_user_turn(args.prompt, args.image, args.video)] if chat else args.prompt
    result = eng.generate(inputs, thinking=args.thinking, stream=printer, max_image_tokens=args.image_tokens,
                          **_gen_kwargs(args))
    if printer is not None:
        printer.done()
    _print_reply(result)
    steps = sum(max(block) for block in result.steps_per_block)
    print(f"[{result.new_tokens.shape[1]} tokens in {len(result.steps_per_block)} blocks, {steps} denoising "
          f"steps, {result.timings['total_s']:.2f} s]", file=sys.stderr)
    return 0


def _read_line(prompt: str) -> str | None:
    """One line of stdin, or None at its end; undecodable bytes become U+FFFD."""
    try:
        return _clean_text(input(prompt))
    except EOFError:
        return None


def _chat(args: argparse.Namespace) -> int:
    _check_model(args, chat=True)
    # A line that is not valid UTF-8 is read with U+FFFD for its bad bytes rather than ending the chat.
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")
    images: list[bytes] = [_read_media(p, "--image", check=False) for p in args.image]
    videos: list[bytes] = [_read_media(p, "--video", check=False) for p in args.video]
    eng = _load(args)
    # The session's room to roll back one answer is the answer budget of its turns.
    session = eng.chat(system=args.system, thinking=args.thinking, max_new_tokens=args.max_new_tokens)
    printer = _DraftPrinter(eng.tokenizer) if args.show_drafts else None
    interactive = sys.stdin.isatty()
    if interactive:
        print("dgemma chat: type a message; /image PATH or /video PATH attaches an image or a video to the next one; "
              "/reset starts over, /exit or Ctrl-D quits.", file=sys.stderr)
    failed = False
    while True:
        line = _read_line("> ")
        if line is None:
            if interactive:
                print(file=sys.stderr)
            break
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/reset":
            session = eng.chat(system=args.system, thinking=args.thinking, max_new_tokens=args.max_new_tokens)
            images, videos = [], []
            continue
        if line.startswith(("/image", "/video")):
            command, path = line[:6], line[6:].strip()
            try:
                data = _read_media(path, command)
            except DgemmaError as e:  # refused now, so that it is not attached to the next message
                print(f"dgemma: error: {_one_line(e)}", file=sys.stderr)
                failed = True
            else:
                (images if command == "/image" else videos).append(data)
            continue
        try:
            result = session.send(_user_turn(line, images, videos), stream=printer, max_image_tokens=args.image_tokens,
                                  **_gen_kwargs(args))
        except DgemmaError as e:  # a bad turn leaves the session usable
            if printer is not None:
                printer.done()
            # The failed turn is dropped whole, its attachments too: otherwise every later message would fail
            # the same way.
            dropped = len(images) + len(videos)
            note = f" (dropped the {dropped} attachment(s) of this message)" if dropped else ""
            print(f"dgemma: error: {_one_line(e)}{note}", file=sys.stderr)
            images, videos = [], []
            failed = True
            continue
        images, videos = [], []
        if printer is not None:
            printer.done()
        _print_reply(result)
        sys.stdout.flush()
    # Interactively an error is shown and the chat goes on; a script piping lines in learns of it here.
    return 1 if failed and not interactive else 0


def _int_list(s: str) -> list[int]:
    try:
        vals = [_positive(x) for x in s.split(",") if x.strip()]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {s!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {s!r}")
    twice = next((v for i, v in enumerate(vals) if v in vals[:i]), None)
    if twice is not None:  # each value names its result rows: twice would give two rows of one name
        raise argparse.ArgumentTypeError(f"{s!r} lists {twice} twice; expected each value once")
    return vals


def _steps_list(s: str) -> list[int]:
    vals = _int_list(s)
    for v in vals:
        _steps(str(v))
    return vals


def _check_output_file(option: str, path: str | None) -> None:
    """Fail before a long run, not after it, when a result file cannot be written."""
    if path is None:
        return
    if not path:
        raise DgemmaError(f"{option} '': an empty path")
    if os.path.isdir(path):
        raise DgemmaError(f"{option} {path}: is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise DgemmaError(f"{option} {path}: no such directory {parent}")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise DgemmaError(f"{option} {path}: not writable")


def _fmt(value, spec: str, width: int) -> str:
    """A number, or ``-`` where it is absent or means nothing (no roofline on a CPU, no time for a
    memory row)."""
    if value is None or value != value or value in (float("inf"), float("-inf")):
        return f"{'-':>{width}}"
    return f"{value:>{width}{spec}}"


def print_bench_table(report: dict, out=None, *, roofline: bool = True) -> None:
    """The bench table, with ``-`` for absent values. ``roofline=False`` (a CPU run) blanks the roofline
    columns: the tiny preset on a CPU is bound by compute and overhead, so bytes over copy bandwidth
    (fractions of a millisecond, shares of 0.0%) would say nothing."""
    out = out or sys.stdout
    print(f"{'name':<34} {'median ms':>11} {'roofline ms':>12} {'share':>7}  extra", file=out)
    for r in report["results"]:
        median = r.get("median_ms")
        roof = r.get("roofline_ms") if roofline else None
        share = r.get("roofline_share") if roofline else None
        extra = "  ".join(f"{k}={v:,.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                          if k not in ("name", "median_ms", "roofline_ms", "roofline_share", "top_kernels"))
        print(f"{r['name']:<34} {_fmt(median or None, '.3f', 11)} {_fmt(roof, '.3f', 12)} "
              f"{_fmt(share, '.1%', 7)}  {extra}".rstrip(), file=out)
    for r in report["results"]:
        if r.get("top_kernels"):
            print(f"\n{r['name']}: where the GPU time goes (kernel, launches, ms)", file=out)
            for k in r["top_kernels"][:8]:
                print(f"  {k['total_ms']:8.3f} ms  {k['launches']:5d}x  {k['name'][:90]}", file=out)


@contextlib.contextmanager
def _environment(**values: str | None):
    """The kernel choices the ops look up at each call (DGEMMA_ATTENTION, DGEMMA_VOCAB_HEAD), set for a block and
    restored after it; None leaves a variable as it is."""
    saved = {k: os.environ.get(k) for k, v in values.items() if v is not None}
    try:
        for k in saved:
            os.environ[k] = values[k]
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_bench_shapes(args: argparse.Namespace, device) -> None:
    """Refuse, before the random weights are made, lengths past the preset's positions and batches whose
    step cannot fit the device's free memory (the engine's memory plan, dgemma.memory: weights + KV cache +
    step workspace), naming the option and value (instead of a skipped row, an error halfway or the OOM killer)."""
    import math

    import torch

    from .bench import preset_and_prompt
    from .cache import available_bytes
    from .config import ModelConfig
    from .memory import check_fits, plan
    from .random_checkpoint import preset_config
    from .weights import expected_shapes, is_quantized_name

    if args.cuda_graphs in ("on", "both") and device.type != "cuda":
        raise DgemmaError(f"--cuda-graphs {args.cuda_graphs}: CUDA graphs need a CUDA device, not {device}; use "
                          f"--cuda-graphs off or auto")
    preset, prompt_len = preset_and_prompt(args.preset, args.prompt_length, device)
    if preset == "26b-a4b" and device.type == "cpu":
        return  # bench.run refuses it with the reason
    cfg = ModelConfig.from_dict(preset_config(preset))
    c, positions = cfg.canvas_length, cfg.max_position_embeddings
    lengths = [("--prompt-length", prompt_len)] + [("--prefill-lengths", t) for t in args.prefill_lengths or []] + \
        [("--prefix-lengths", t) for t in args.prefix_lengths or []]
    for flag, t in lengths:
        if t + c > positions:
            raise DgemmaError(f"{flag} {t}: {t} tokens and a {c}-token canvas exceed the {preset} preset's "
                              f"max_position_embeddings {positions}; expected at most {positions - c}")
    free = available_bytes(device)
    if free is None:
        return
    dtype = torch.float32 if args.precision == "float32" else torch.bfloat16
    item = dtype.itemsize
    weights = sum(math.prod(shape) * (1 if args.precision == "fp8" and is_quantized_name(key) else item)
                  for key, shape in expected_shapes(cfg).items())
    context = max(t for _, t in lengths) + c
    fused = device.type == "cuda"  # the smaller estimate where the engine may fuse the vocabulary head
    for b in args.batch:
        try:
            check_fits(plan(cfg, weights, b, context, dtype, fused_vocab_head=fused), free)
        except DgemmaError as e:
            raise DgemmaError(f"--batch {b}: {_one_line(e)}") from None


def _bench(args: argparse.Namespace) -> int:
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise DgemmaError("--plot needs matplotlib (pip install matplotlib)") from None
    _check_output_file("--json", args.json)
    _check_output_file("--plot", args.plot)
    if args.plot is not None:
        from matplotlib.figure import Figure

        # pgf writes through a TeX installation: refused here rather than failing after the whole run.
        kinds = {k: v for k, v in Figure().canvas.get_supported_filetypes().items() if k != "pgf"}
        kind = os.path.splitext(args.plot)[1][1:].lower()
        if kind not in kinds:
            raise DgemmaError(f"--plot {args.plot}: {'no file type' if not kind else repr(kind)} is not an image "
                              f"type matplotlib writes; expected a file ending in one of {', '.join(sorted(kinds))}")
    if args.json is not None and args.plot is not None and os.path.abspath(args.json) == os.path.abspath(args.plot):
        raise DgemmaError(f"--json and --plot name the same file {args.json}")
    if args.baseline == "transformers":
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise DgemmaError("--baseline transformers needs transformers (pip install transformers)") from None
    import torch

    from .bench import BenchOptions, run, save_plot
    from .engine import resolve_device

    device = resolve_device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                            else args.device)
    _check_bench_shapes(args, device)
    opts = BenchOptions(preset=args.preset, device=args.device, dtype=args.precision, batch_sizes=args.batch,
                        prompt_length=args.prompt_length, steps=args.steps, iters=args.iters,
                        warmup=args.warmup, baseline=args.baseline, prefix_lengths=args.prefix_lengths or [],
                        seed=args.seed, cuda_graphs=args.cuda_graphs, prefill_lengths=args.prefill_lengths)
    with _environment(DGEMMA_ATTENTION=args.attention, DGEMMA_VOCAB_HEAD=args.vocab_head):
        report = run(opts, log=lambda m: print(m, file=sys.stderr))
    print_bench_table(report, roofline=device.type == "cuda")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        save_plot(report, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _seed(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {s!r}") from None
    if not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"seed {s} is out of range (expected 0 to 2**64 - 1)")
    return v


def _serve(args: argparse.Namespace) -> int:
    args.image, args.video = [], []
    if args.cuda_graphs:
        raise DgemmaError("--cuda-graphs applies to generate and chat; the server runs the steps of its requests as "
                          "one batched decoder pass")
    _check_model(args, chat=True)
    if not 0 < args.port < 65536:
        raise DgemmaError(f"--port {args.port} must be in 1..65535")
    from .server import serve

    import torch

    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    serve(args.model, host=args.host, port=args.port, max_batch=args.max_batch, max_context=args.max_context,
          served_model_name=args.served_model_name, device=args.device, dtype=dtype,
          quantization=None if args.quantization == "none" else args.quantization)
    return 0


def _add_load_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="checkpoint directory (config.json, safetensors, tokenizer.json, chat template)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weights/activations dtype (default: the checkpoint's)")
    p.add_argument("--quantization", default="none", choices=["none", "fp8"],
                   help="fp8: FP8 E4M3 attention, MLP and expert weights, quantised while loading (default: none)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay denoising steps from CUDA graphs (CUDA backend, FP8 experts; same tokens)")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    _add_load_options(p)
    p.add_argument("--thinking", action="store_true", help="let the model reason first (chat template's <|think|>)")
    p.add_argument("--max-new-tokens", type=_positive, default=None,
                   help="token budget, rounded up to whole canvases (default: generation_config.json or 256)")
    p.add_argument("--steps", type=_steps, default=None,
                   help="maximum denoising steps per canvas, at most 1024 (default: generation_config.json or 48)")
    p.add_argument("--seed", type=_seed, default=None, help="seed for reproducible output (0 to 2**64 - 1)")
    p.add_argument("--show-drafts", action="store_true",
                   help="show the canvas after every denoising step (steps numbered 1, 2, … within each block)")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image for the (first) user turn; repeatable, in order (needs a checkpoint with a vision "
                        "tower)")
    p.add_argument("--video", action="append", default=[], metavar="PATH",
                   help="a video (MP4 and what PyAV decodes) for the (first) user turn, read at 1 frame per second, at "
                        "most 60 frames; repeatable")
    p.add_argument("--image-tokens", type=int, default=280, choices=[70, 140, 280, 560, 1120],
                   help="soft tokens per image at most (default: 280)")


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line on stderr and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def _print_message(self, message, file=None):
        # argparse ignores write errors; a closed pipe must reach main()'s BrokenPipeError handler.
        if message:
            (file or sys.stderr).write(message)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog="dgemma", description="Fast inference for DiffusionGemma.")
    p.add_argument("--version", action="version", version=f"dgemma {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    d = sub.add_parser("demo", help="run a tiny random checkpoint; --save DIR keeps a complete one to chat with",
                       description="Writes a tiny random checkpoint, encodes a prompt and denoises a canvas. "
                                   "With --save DIR the checkpoint is kept, with a tokenizer, a chat template and a "
                                   "generation config, so that `dgemma generate`/`dgemma chat --model DIR` run on it "
                                   "(its replies are random text).")
    d.add_argument("--save", default=None, metavar="DIR",
                   help="keep a complete checkpoint (weights, tokenizer.json, chat template) in DIR")
    d.add_argument("--preset", default="tiny", choices=["tiny"], help="model preset (default: tiny)")
    d.add_argument("--seed", type=_seed, default=0, help="seed for weights, prompt and canvas (default: 0)")
    d.add_argument("--prompt-length", type=_positive, default=24, help="prompt tokens (default: 24)")
    d.add_argument("--canvas", type=_positive, default=32, help="canvas tokens (default: 32)")
    d.add_argument("--steps", type=_steps, default=8, help="at most this many denoising steps, up to 1024 (default: 8)")
    d.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    d.set_defaults(func=_demo)

    g = sub.add_parser("generate", help="generate from a prompt")
    _add_model_options(g)
    g.add_argument("--prompt", required=True, help="the prompt text")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    g.set_defaults(func=_generate)

    c = sub.add_parser("chat", help="interactive multi-turn chat (reuses the KV cache across turns)",
                       description="Reads one message per line from stdin. Interactively, /image PATH or /video "
                                   "PATH attaches an image or a video to the next message, /reset starts over, /exit "
                                   "or Ctrl-D quits. With "
                                   "stdin not a terminal, the exit status is 1 if any turn failed.")
    _add_model_options(c)
    c.add_argument("--system", default=None, help="system prompt")
    c.set_defaults(func=_chat)

    v = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                       description="OpenAI-compatible server: /v1/chat/completions, /v1/completions, /v1/models, "
                                   "/health, /metrics. Needs FastAPI and uvicorn (pip install 'dgemma[serve]').")
    _add_load_options(v)
    v.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 for every interface (default: 127.0.0.1)")
    v.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    v.add_argument("--max-batch", type=_positive, default=8, help="requests holding a slot at once (default: 8)")
    v.add_argument("--max-context", type=_positive, default=None,
                   help="prompt + answer positions per request (default: the model's max_position_embeddings)")
    v.add_argument("--served-model-name", default=None,
                   help="the model id clients name (default: the checkpoint directory's name)")
    v.set_defaults(func=_serve)

    b = sub.add_parser("bench", help="benchmark denoising steps, blocks and prefill on random weights",
                       description="Times a denoising step, 256-token blocks at 16 and 48 steps (with the commit "
                                   "pass), prefill and time to first draft, each beside its HBM roofline (on a GPU; "
                                   "`-` on a CPU). Default: the 26B-A4B shapes on a GPU, a small preset on a CPU.")
    b.add_argument("--preset", default="auto", choices=["auto", "tiny", "26b-a4b"],
                   help="model shapes (default: 26b-a4b on a GPU, tiny on a CPU)")
    b.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    b.add_argument("--precision", default="bfloat16", choices=["fp8", "bfloat16", "float32"],
                   help="fp8: FP8 projections and experts with bf16 activations (default: bfloat16)")
    b.add_argument("--batch", type=_int_list, default=[1], help="comma-separated batch sizes (default: 1)")
    b.add_argument("--prompt-length", type=_positive, default=None,
                   help="prompt tokens before the canvas (default: 1024 on 26b-a4b, 64 on tiny)")
    b.add_argument("--steps", type=_steps_list, default=[16, 48],
                   help="denoising steps per block, each at most 1024 (default: 16,48)")
    b.add_argument("--prefill-lengths", type=_int_list, default=None,
                   help="also time prefill of prompts of these lengths (rows prefill_t<T>_<precision>_b<B>; "
                        "default: 4096 on 26b-a4b, none on tiny)")
    b.add_argument("--prefix-lengths", type=_int_list, default=None,
                   help="also time a step after these prefix lengths (for --plot)")
    b.add_argument("--iters", type=_positive, default=20,
                   help="timed repetitions of a step (default: 20; blocks and prefill take a quarter or an eighth, "
                        "at least 3 and 2)")
    b.add_argument("--warmup", type=_non_negative, default=3, help="warm-up repetitions of a step (default: 3)")
    b.add_argument("--seed", type=_seed, default=0, help="seed of the random weights and inputs (default: 0)")
    b.add_argument("--baseline", choices=["transformers"], default=None,
                   help="also time transformers' model on the same weights and report the speed-up")
    b.add_argument("--cuda-graphs", default="auto", choices=["auto", "off", "on", "both"],
                   help="time steps and blocks without (off) and/or with CUDA graphs (rows *_graphs_*); auto: both "
                        "where the step can be captured (CUDA, fused head, FP8 experts), else off")
    b.add_argument("--attention", default=None, choices=["auto", "mma_sync", "wgmma", "wgmma_deep"],
                   help="the attention kernel on a GPU (default: DGEMMA_ATTENTION, else auto: per call by shape)")
    b.add_argument("--vocab-head", default=None, choices=["mma_sync", "wgmma"],
                   help="the fused vocabulary head's GEMMs on a GPU (default: DGEMMA_VOCAB_HEAD, else wgmma)")
    b.add_argument("--json", default=None, help="write the results to this JSON file")
    b.add_argument("--plot", default=None,
                   help="write a plot (PNG, SVG, PDF, ... by its extension): latency vs batch and vs prefix length, "
                        "with roofline (needs matplotlib)")
    b.set_defaults(func=_bench)
    return p


def _positive(s: str) -> int:
    v = _ascii_int(s, "a positive integer")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _non_negative(s: str) -> int:
    v = _ascii_int(s, "an integer >= 0")
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def _steps(s: str) -> int:
    """Denoising steps: 1 to the sampler's limit (checked here, before anything is loaded or written)."""
    from .sampler import MAX_DENOISING_STEPS

    v = _positive(s)
    if v > MAX_DENOISING_STEPS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_DENOISING_STEPS} denoising steps, got {v}")
    return v


def _ascii_int(s: str, what: str) -> int:
    """An integer written in ASCII digits (int() also takes other scripts' digits and underscores)."""
    t = s.strip()
    if not t or not t.isascii() or "_" in t:
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
    try:
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None


def _flush_stdout() -> None:
    if sys.stdout is not None:
        sys.stdout.flush()


def _quiet_stdout() -> None:
    """After EPIPE the interpreter's own flush at exit would fail again and print a warning; point
    stdout at /dev/null so that exit is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# The standard streams each command reads or writes: one that is closed (``<&-``, ``>&-``: Python makes it None)
# is refused in one line before anything loads.
_STREAMS_NEEDED = {"demo": ("stdout",), "generate": ("stdout",), "chat": ("stdin", "stdout"), "bench": ("stdout",),
                   "serve": ()}
_STREAM_USE = {"stdin": "the messages are read from it; redirect it from a file or /dev/null instead",
               "stdout": "the output is written to it; redirect it to a file or /dev/null instead"}


def _check_streams(command: str) -> None:
    for name in _STREAMS_NEEDED.get(command, ("stdout",)):
        if getattr(sys, name) is None:
            raise DgemmaError(f"{name} is closed: `dgemma {command}` needs it ({_STREAM_USE[name]})")


def main(argv: list[str] | None = None) -> int:
    if sys.stderr is None:  # closed (2>&-): errors go nowhere rather than to stdout (print's fallback for None)
        try:
            sys.stderr = open(os.devnull, "w")
        except OSError:
            pass
    # Output that cannot be encoded in the terminal's charset is escaped, never a crash.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):
                pass
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:
            _flush_stdout()  # --help / --version into a closed pipe fails here, not at exit
            raise
        _check_streams(args.command)
        for name in ("prompt", "system"):
            if hasattr(args, name):
                setattr(args, name, _clean_text(getattr(args, name)))
        rc = args.func(args)
        _flush_stdout()
        return rc
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly, but not as a success
        _quiet_stdout()
        return 141
    except (DgemmaError, OSError) as e:
        print(f"dgemma: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dgemma: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, MemoryError, UnicodeError) as e:
        # Failures of the environment (a CUDA error, out of memory): one line unless debugging.
        if os.environ.get("DGEMMA_DEBUG"):
            raise
        print(f"dgemma: error: {type(e).__name__}: {_one_line(e)} (DGEMMA_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
