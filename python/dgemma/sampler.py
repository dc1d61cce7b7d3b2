"""The entropy-bounded sampler of one denoising step, and the adaptive stopping rule.

Per step n = N…1: temperature t = t_min + (t_max − t_min)·n/N; candidates are drawn from
softmax(logits/t); positions are sorted by entropy and the prefix whose ``cumsum − current``
stays within ``entropy_bound`` takes its candidate (always at least one); every other position is
re-drawn uniformly from the vocabulary. A block stops when its argmax canvas has not changed for
``stability_threshold`` steps and the mean entropy is below ``confidence_threshold``.

The reference draws its random numbers in the same order, shapes and dtypes as transformers'
``DiffusionGemmaForBlockDiffusion.generate`` (multinomial, then uniform ids, per step), so a seeded
generator reproduces its sequences token for token.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace

import torch

from .config import read_json_file
from .errors import ConfigError, DgemmaError, NonFiniteError

# Decoder passes per block at most: real settings use tens; each pass costs a full decoder forward.
MAX_DENOISING_STEPS = 1024
# The lowest temperature a step may sample at (the last step's, t_min + (t_max - t_min) / steps): below it the logits
# divided by it overflow fp32 (the probabilities become NaN), and sampling is greedy long before.
MIN_TEMPERATURE = 1e-6
# The token budget when neither the call nor generation_config.json sets one (transformers' default too).
DEFAULT_MAX_NEW_TOKENS = 256


@dataclass(frozen=True, slots=True)
class GenerationSettings:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_max: float = 0.8
    t_min: float = 0.4
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    # The whole sequence's length (cached tokens, prompt and new tokens), from generation_config.json where it sets
    # max_length and leaves max_new_tokens at 256 (transformers' rule): the budget is then max_length minus what
    # precedes the new tokens. None: max_new_tokens.
    max_length: int | None = None

    def validate(self) -> "GenerationSettings":
        def positive_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise DgemmaError(f"{name} must be a positive integer, got {v!r:.80}")

        positive_int("max_new_tokens")
        positive_int("max_denoising_steps")
        if self.max_length is not None:
            positive_int("max_length")
        if self.max_denoising_steps > MAX_DENOISING_STEPS:
            raise DgemmaError(f"max_denoising_steps must be at most {MAX_DENOISING_STEPS}, got "
                              f"{self.max_denoising_steps}")
        for name in ("entropy_bound", "t_max", "t_min", "confidence_threshold"):
            v = getattr(self, name)
            try:
                finite = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(float(v))
            except OverflowError:  # an int beyond the float range
                finite = False
            if not finite:
                raise DgemmaError(f"{name} must be a finite number, got {v!r:.80}")
            # Held as a float: tensor arithmetic takes any float, but not an int beyond 64 bits.
            object.__setattr__(self, name, float(v))
        if self.entropy_bound <= 0:
            raise DgemmaError(f"entropy_bound must be positive, got {self.entropy_bound}")
        if self.confidence_threshold <= 0:
            raise DgemmaError(f"confidence_threshold must be positive, got {self.confidence_threshold}")
        if self.t_min < 0:
            raise DgemmaError(f"t_min must be >= 0, got {self.t_min}")
        if self.t_max <= self.t_min:
            raise DgemmaError(f"t_max ({self.t_max}) must be greater than t_min ({self.t_min})")
        lowest = self.t_min + (self.t_max - self.t_min) / self.max_denoising_steps
        if lowest < MIN_TEMPERATURE:
            raise DgemmaError(f"the last denoising step's temperature t_min + (t_max - t_min) / max_denoising_steps = "
                              f"{lowest:.3g} (t_min {self.t_min:g}, t_max {self.t_max:g}, {self.max_denoising_steps} "
                              f"steps) is below {MIN_TEMPERATURE:g}, where the logits divided by it overflow; raise "
                              f"t_max or t_min")
        st = self.stability_threshold
        if isinstance(st, bool) or not isinstance(st, int) or st < 0:
            raise DgemmaError(f"stability_threshold must be an integer >= 0, got {st!r:.80}")
        if st > MAX_DENOISING_STEPS:
            raise DgemmaError(f"stability_threshold must be at most {MAX_DENOISING_STEPS}, got {st}")
        return self

    def updated(self, **overrides) -> "GenerationSettings":
        """A copy with the non-None ``overrides`` applied, validated."""
        known = {f.name for f in fields(self)}
        return replace(self, **{k: v for k, v in overrides.items() if v is not None and k in known}).validate()


def read_generation_config(path: str) -> tuple[GenerationSettings, dict]:
    """Defaults from a checkpoint's ``generation_config.json`` (where set) and its special-token ids."""
    file = os.path.join(path, "generation_config.json")
    settings = GenerationSettings()
    if not os.path.isfile(file):
        return settings, {}
    raw = read_json_file(file)
    sampler = raw.get("sampler_config")
    if sampler is not None and not isinstance(sampler, dict):
        raise ConfigError(f"{file}: sampler_config = {sampler!r:.60}, expected an object such as "
                          f"{{\"entropy_bound\": 0.1}}")
    overrides = {f.name: raw.get(f.name) for f in fields(settings)}
    overrides["entropy_bound"] = (sampler or {}).get("entropy_bound")
    try:
        settings = settings.updated(**overrides)
    except DgemmaError as e:
        raise ConfigError(f"{file}: {e}") from None
    if settings.max_new_tokens != DEFAULT_MAX_NEW_TOKENS:  # max_new_tokens takes precedence
        settings = replace(settings, max_length=None)
    tokens = {k: raw[k] for k in ("eos_token_id", "pad_token_id", "bos_token_id") if raw.get(k) is not None}
    for key, value in tokens.items():
        ids = value if isinstance(value, list) and key == "eos_token_id" else [value]
        if not all(type(i) is int and 0 <= i < 1 << 31 for i in ids):
            raise ConfigError(f"{file}: {key} = {value!r:.80}, expected a non-negative token id"
                              + (" or a list of them" if key == "eos_token_id" else ""))
    return settings, tokens


def temperature(step: int, settings: GenerationSettings, device) -> torch.Tensor:
    """t = t_min + (t_max − t_min)·step/N, evaluated in fp32 tensor arithmetic as the reference does."""
    cur = torch.tensor(step, device=device, dtype=torch.int32)
    return settings.t_min + ((settings.t_max - settings.t_min) * (cur / settings.max_denoising_steps))


@dataclass(slots=True)
class StepOutput:
    processed_logits: torch.Tensor  # logits / t, fp32 [B, C, V]
    argmax: torch.Tensor  # [B, C]
    next_canvas: torch.Tensor  # [B, C]: accepted candidates, other positions re-drawn
    accepted: torch.Tensor  # bool [B, C]
    entropy: torch.Tensor  # fp32 [B, C], of softmax(logits / t)


def entropy_bound_accept(entropy: torch.Tensor, bound: float) -> torch.Tensor:
    """Accept the lowest-entropy positions while ``cumsum − current <= bound`` (always >= 1)."""
    sorted_entropy, order = torch.sort(entropy, dim=-1, descending=False)
    selected = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= bound
    return torch.scatter(torch.zeros_like(selected), -1, order, selected)


def reference_sample_step(logits: torch.Tensor, canvas: torch.Tensor, temp: torch.Tensor, bound: float,
                          generator: torch.Generator | None) -> StepOutput:
    b, c, v = logits.shape
    processed = logits / temp
    probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
    candidates = torch.multinomial(probs.view(-1, v), num_samples=1, generator=generator).view(b, c)
    argmax = torch.argmax(processed, dim=-1)
    entropy = torch.distributions.Categorical(logits=processed).entropy()
    accepted = entropy_bound_accept(entropy, bound)
    kept = torch.where(accepted, candidates, canvas)
    noise = torch.randint(0, v, (b, c), generator=generator, device=canvas.device)
    return StepOutput(processed, argmax, torch.where(~accepted, noise, kept), accepted, entropy)


class StableAndConfident:
    """Stop a row when its argmax canvas equals each of the last ``stability`` ones and its mean entropy
    is below ``confidence`` (stability 0: confidence alone)."""

    def __init__(self, stability: int, confidence: float):
        self.stability, self.confidence = stability, confidence
        self.history: torch.Tensor | None = None

    def __call__(self, argmax: torch.Tensor, mean_entropy: torch.Tensor) -> torch.Tensor:
        """``argmax`` [B, C] of this step, ``mean_entropy`` [B] over the canvas; bool [B]. The history of
        canvases is updated in place (one buffer from the first call on: a CUDA graph can replay a call)."""
        if self.stability == 0:
            stable = torch.ones(argmax.shape[0], dtype=torch.bool, device=argmax.device)
        else:
            if self.history is None:
                self.history = torch.full((self.stability, *argmax.shape), -1, dtype=argmax.dtype,
                                          device=argmax.device)
            stable = (self.history == argmax[None]).all(dim=-1).all(dim=0)
            self.history.copy_(torch.roll(self.history, shifts=-1, dims=0))
            self.history[-1].copy_(argmax)
        return stable & (mean_entropy < self.confidence)

    def reset(self) -> None:
        """Forget the canvases seen (a new block), keeping the history's buffer."""
        if self.history is not None:
            self.history.fill_(-1)


@dataclass(slots=True)
class Draw:
    """What a sampler returns for one denoising step of a canvas."""

    argmax: torch.Tensor        # [B, C]: the argmax canvas (committed when the block stops)
    next_canvas: torch.Tensor   # [B, C]: accepted candidates, other positions re-drawn
    mean_entropy: torch.Tensor  # fp32 [B]: mean over the canvas of the entropy of softmax(logits / t)
    soft: torch.Tensor          # [B, C, H]: the next step's self-conditioning input, softmax(logits / t)·E·scale


class TorchStreamSampler:
    """fp32 logits and torch's random stream: draws in transformers' order, so a seeded generator gives
    its sequences token for token (the parity oracle of every other sampler)."""

    def __init__(self, model, settings: GenerationSettings, generator: torch.Generator | None):
        self.model, self.settings, self.generator = model, settings, generator

    def step(self, h: torch.Tensor, canvas: torch.Tensor, n: int, finished: torch.Tensor) -> Draw:
        m, s = self.model, self.settings
        logits = m.logits(h)
        try:
            out = m.ops.sample_step(logits, canvas, temperature(n, s, h.device), s.entropy_bound, self.generator)
        except RuntimeError:
            # torch.multinomial refuses NaN probabilities; checked only here, off the normal path.
            bad = ~torch.isfinite(logits)
            if bool(bad.any()):
                row, pos, _ = (int(x) for x in bad.nonzero()[0])
                raise NonFiniteError(f"the logits of row {row} at canvas position {pos} are not finite") from None
            raise
        # transformers hands the processed logits to the next step in the embedding dtype.
        soft = m.soft_input(out.processed_logits.to(m.w.embed.dtype))
        return Draw(out.argmax, out.next_canvas, out.entropy.mean(dim=-1), soft)


class HeadScalars:
    """The fused head's step scalars in device buffers, which its kernels read (so one captured launch serves
    every step): (seed, step counter) int64 [2] and the temperature fp32 [1]. Written with fill kernels,
    never a host-to-device copy that would wait for the stream."""

    def __init__(self, device: torch.device | str):
        # Normal tensors even when made in inference mode (generate runs in it): set() fills them in either mode.
        with torch.inference_mode(False):
            self.seed_step = torch.zeros(2, dtype=torch.int64, device=device)
            self.temperature = torch.ones(1, dtype=torch.float32, device=device)

    def set(self, seed: torch.Tensor, step: int, temperature: float) -> None:
        """``seed``: an int64 [1] tensor on the buffers' device (copied there, device to device)."""
        self.seed_step[:1].copy_(seed)
        self.seed_step[1].fill_(step)
        self.temperature.fill_(temperature)


class PhiloxHeadSampler:
    """The fused vocabulary head (``ops.vocab_head_step``): no logits tensor, dgemma's own counter-based
    stream keyed by one seed per generation, drawn from ``generator``; the step counter runs across blocks.

    A step is :meth:`prepare` (host: write the step's seed, counter and temperature into :attr:`scalars`)
    then :meth:`draw` (device only: reads nothing on the host, so a CUDA graph can capture it)."""

    def __init__(self, model, settings: GenerationSettings, generator: torch.Generator | None,
                 device: torch.device, scalars: HeadScalars | None = None):
        self.model, self.settings = model, settings
        # The seed stays on the device (int64 [1]): reading it on the host would wait for the stream.
        self.seed = torch.randint(0, 2**62, (1,), generator=generator, device=device)
        self.counter = 0
        self.scalars = scalars or HeadScalars(device)

    def prepare(self, n: int) -> None:
        """Write step ``n``'s scalars (temperature of step n of N, the next counter) for :meth:`draw`."""
        self.scalars.set(self.seed, self.counter, float(temperature(n, self.settings, "cpu")))
        self.counter += 1

    def launch_settings(self) -> tuple[float, float]:
        """The settings :meth:`draw` hands its kernels as launch arguments, not through :attr:`scalars`: a CUDA
        graph captured with one value replays that value, so a graph serves only draws with the same ones."""
        return self.settings.entropy_bound, self.settings.confidence_threshold

    def draw(self, h: torch.Tensor, canvas: torch.Tensor, finished: torch.Tensor) -> Draw:
        m, s = self.model, self.settings
        out = m.ops.vocab_head_step(
            h, m.w.embed, self.scalars.temperature, self.scalars.seed_step, None, canvas, None, s.entropy_bound,
            confidence_threshold=s.confidence_threshold, finished=finished, softcap=m.cfg.final_logit_softcapping,
            soft_scale=m.cfg.embed_scale, embed_fp8=m.w.embed_fp8)
        return Draw(out.argmax, out.next_canvas, out.mean_entropy, out.soft.to(m.w.embed.dtype))

    def step(self, h: torch.Tensor, canvas: torch.Tensor, n: int, finished: torch.Tensor) -> Draw:
        self.prepare(n)
        return self.draw(h, canvas, finished)


def make_sampler(engine, settings: GenerationSettings, generator: torch.Generator | None):
    """The fused head where the backend runs it (``ops.fused_vocab_head``), else the torch-stream sampler."""
    if engine.model.ops.fused_vocab_head(engine, settings):
        return PhiloxHeadSampler(engine.model, settings, generator, engine.device)
    return TorchStreamSampler(engine.model, settings, generator)
