"""Image and video inputs for DiffusionGemma: decoding, Gemma 4 preprocessing and prompt placeholders.

The results are numerically equal to what transformers 5.23 computes for the same inputs, without importing
transformers:

* images: ``Gemma4ImageProcessorPil`` (the PIL/NumPy backend; the torchvision backend resizes with a different
  bicubic kernel and gives other pixels), see :func:`preprocess_images`;
* video: ``Gemma4VideoProcessor`` running on the CPU, see :func:`preprocess_video`; frames are sampled and
  decoded like ``transformers.video_utils.load_video(..., backend="pyav")``, see :func:`load_video`;
* prompts: the placeholder expansion of ``Gemma4Processor`` (the processor DiffusionGemma is paired with), see
  :func:`expand_image_tokens`, :func:`expand_video_tokens` and :func:`mm_token_type_ids`.

Prompt format. Every ``<|image|>`` in a prompt stands for one image and becomes::

    <|image>  <|image|> * N  <image|>            (no spaces; N = num_soft_tokens_per_image[i])

Every ``<|video|>`` stands for one video and becomes, per sampled frame, ``"mm:ss <|image>" + "<|video|>" * N +
"<image|>"``, the frames joined by one space (N = num_soft_tokens_per_video[i], the soft tokens of one frame).
``mm_token_type_ids`` is 1 at ``<|image|>`` ids, 2 at ``<|video|>`` ids and 0 everywhere else (``<|image>``,
``<image|>`` and the timestamp text included).

Pillow (images) and PyAV (video) are imported only when needed.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

from .errors import DgemmaError

PATCH_SIZE = 16
POOLING_KERNEL_SIZE = 3
SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
DEFAULT_IMAGE_SOFT_TOKENS = 280  # Gemma4ImageProcessor.max_soft_tokens
DEFAULT_VIDEO_SOFT_TOKENS = 70  # Gemma4VideoProcessor.max_soft_tokens (per frame)

TEXT_TOKEN_TYPE = 0
IMAGE_TOKEN_TYPE = 1
VIDEO_TOKEN_TYPE = 2

# What load_image accepts: a file path, encoded bytes, a PIL image, a numpy array or a torch tensor.
ImageLike = Union[str, os.PathLike, bytes, bytearray, memoryview, "PIL.Image.Image", np.ndarray, torch.Tensor]


@dataclass(frozen=True)
class VisionTokens:
    """The placeholder strings and ids of the vision tokens (defaults: DiffusionGemma's config and tokenizer)."""

    image: str = "<|image|>"
    boi: str = "<|image>"
    eoi: str = "<image|>"
    video: str = "<|video|>"
    image_id: int = 258_880
    boi_id: int = 255_999
    eoi_id: int = 258_882
    video_id: int = 258_884

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> VisionTokens:
        """The default strings with the ids ``tokenizer.token_id(text)`` gives them (e.g. a dgemma Tokenizer)."""
        lookup: Callable[[str], int | None] = tokenizer.token_id
        base = cls()
        ids = {}
        for field, text in (("image_id", base.image), ("boi_id", base.boi), ("eoi_id", base.eoi),
                            ("video_id", base.video)):
            token_id = lookup(text)
            if token_id is None:
                raise DgemmaError(f"the tokenizer has no {text!r} token; vision inputs need Gemma 4's image tokens")
            ids[field] = int(token_id)
        return cls(**ids)


GEMMA4_VISION_TOKENS = VisionTokens()


# --------------------------------------------------------------------------------------------------- helpers


def _describe(value: Any) -> str:
    """A short description of a bad input for error messages (never the whole payload)."""
    if isinstance(value, (str, os.PathLike)):
        return repr(os.fspath(value))
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        return f"<{len(data)} bytes starting {data[:12]!r}>"
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return f"{type(value).__module__}.{type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    return f"{type(value).__name__} {text[:80]}{'...' if len(text) > 80 else ''}"


def _pil():
    try:
        import PIL.Image
        import PIL.ImageOps
    except ImportError:
        raise DgemmaError("image inputs need Pillow (pip install pillow)") from None
    return PIL.Image, PIL.ImageOps


def _av():
    try:
        import av
    except ImportError:
        raise DgemmaError("video inputs need PyAV (pip install av)") from None
    return av


def _is_pil_image(value: Any) -> bool:
    # An object can only be a PIL image if PIL.Image was imported already, so this imports nothing.
    module = sys.modules.get("PIL.Image")
    return module is not None and isinstance(value, module.Image)


def _is_url(text: str) -> bool:
    return text.strip().lower().startswith(("http://", "https://", "data:"))


def _check_int(name: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DgemmaError(f"{name}={value!r} is not valid; expected an integer >= {minimum}")
    return int(value)


def _check_budget(max_soft_tokens: Any) -> int:
    if isinstance(max_soft_tokens, bool) or max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
        raise DgemmaError(f"max_soft_tokens={max_soft_tokens!r} is not supported; expected one of "
                          f"{', '.join(map(str, SUPPORTED_SOFT_TOKENS))}")
    return int(max_soft_tokens)


# --------------------------------------------------------------------------------------------------- images


def load_image(image: ImageLike, *, layout: str | None = None) -> np.ndarray:
    """Decode or convert one image to an RGB ``uint8`` array of shape ``(H, W, 3)``.

    Accepted, as transformers' Gemma 4 processor accepts them:

    * a file path (``str`` or ``os.PathLike``) or the encoded file as ``bytes``: decoded with Pillow, rotated by
      its EXIF orientation and converted with ``convert("RGB")``, exactly as ``transformers.image_utils.load_image``
      does for a path, then as a PIL image below. The first conversion drops an alpha band without compositing
      it (transparent pixels keep their stored colour); only a transparent colour key (GIF/PNG palette or
      ``tRNS`` transparency) is still composited onto white. As in transformers, a string that is not a file may be
      the encoded image in base64 (64 characters or more) or a ``data:image/<type>;base64,`` URL; ``http://`` and
      ``https://`` URLs are refused: download the file first. An encoded image declaring more than
      ``MAX_DECODED_PIXELS`` (Pillow's limit, about 89 Mpx) is refused before decoding.
    * a ``PIL.Image.Image``: images with an alpha band or a ``transparency`` entry are composited onto white,
      others converted with ``convert("RGB")``; no EXIF rotation (transformers applies none to PIL inputs).
    * a numpy array or torch tensor of shape ``(H, W, C)`` or ``(C, H, W)`` with C in 1, 3, 4 (grey, RGB, RGBA).
      The layout is guessed as transformers guesses it: a leading axis of size 1, 3 or 4 is the channel axis,
      otherwise the last one; pass ``layout="HWC"`` or ``"CHW"`` for arrays where that guess is wrong (e.g. an
      RGB image 3 or 4 pixels high). A 2-D ``(H, W)`` array is a grey image (transformers refuses those).
      ``uint8`` and other integer arrays hold values in [0, 255]; RGBA is composited onto white and rounded like
      transformers. Float arrays hold values in [0, 1] and are quantised the way transformers quantises them
      before its PIL resize (``uint8(float32(x * 255))``, truncating). Unlike transformers 5.23, which then
      divides float images by 255 a second time (its pixel values end up in [0, 1/255]) and skips the
      quantisation when no resize is needed, dgemma processes float input as that uint8 image.
    """
    if layout not in (None, "HWC", "CHW"):
        raise DgemmaError(f"layout={layout!r} is not valid; expected None, 'HWC' or 'CHW'")
    if isinstance(image, (str, os.PathLike)):
        return _image_from_path(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _image_from_bytes(bytes(image))
    if isinstance(image, torch.Tensor):
        return _image_from_array(_tensor_to_numpy(image), layout, image)
    if isinstance(image, np.ndarray):
        return _image_from_array(image, layout, image)
    if _is_pil_image(image):
        return _image_from_pil(image)
    raise DgemmaError(f"cannot use {_describe(image)} as an image; expected a file path, encoded image bytes, "
                      f"a PIL image, a numpy array or a torch tensor")


# The most pixels an encoded image may declare (Pillow's own MAX_IMAGE_PIXELS, about 89 Mpx): decoding is refused
# above it before any pixel is decoded. Pillow only warns between one and two times its limit, so an 18 KB PNG
# declaring 151 Mpx took 2.4 GB to decode (a server takes images from any client); the model sees at most ~2.6 Mpx.
MAX_DECODED_PIXELS = 89_478_485

# A string this long that is not a file and decodes as base64 is taken as an encoded image (transformers'
# load_image takes base64 strings too); shorter ones are reported as missing files (a mistyped path).
_BASE64_MIN_CHARS = 64
_DATA_URL = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,", re.ASCII | re.IGNORECASE)


def _image_from_path(path: str | os.PathLike) -> np.ndarray:
    name = os.fsdecode(os.fspath(path))
    if isinstance(path, str) and name.lstrip()[:5].lower() == "data:":
        data = _base64_image(name.strip())
        if data is None:
            raise DgemmaError(f"image data URL {name[:60]!r}... is not a base64 image; expected "
                              f"'data:image/<type>;base64,<data>'")
        return _image_from_bytes(data)
    if _is_url(name):
        raise DgemmaError(f"image {name[:120]!r} is a URL; dgemma does not fetch images: download it first and "
                          f"pass the file path or its bytes")
    shown = repr(name) if len(name) <= 200 else f"{name[:120]!r}... ({len(name)} characters)"
    if not os.path.exists(name):
        # Not for what reads as a path (absolute, home, relative): a missing file stays a missing file.
        data = _base64_image(name) if isinstance(path, str) and not name.startswith(("/", "~", ".")) else None
        if data is not None:
            try:
                return _image_from_bytes(data)
            except DgemmaError as e:
                raise DgemmaError(f"image file {shown} does not exist, nor is it a base64 image ({e})") from None
        raise DgemmaError(f"image file {shown} does not exist")
    if not os.path.isfile(name):
        raise DgemmaError(f"image path {shown} is not a file")
    Image, _ = _pil()
    try:
        with Image.open(name) as opened:
            _check_declared_size(opened, f"image file {shown}")
            return _decoded_to_rgb(opened)
    except DgemmaError:
        raise
    except Exception as e:  # decoders raise many types (OSError, SyntaxError, struct.error, ...)
        raise DgemmaError(f"cannot decode image file {shown}: {e}") from None


def _base64_image(text: str) -> bytes | None:
    """The bytes of a base64 image string (optionally a ``data:image/...;base64,`` URL), or None where ``text`` is
    too short or not base64."""
    if text[:5].lower() == "data:":
        match = _DATA_URL.match(text)
        if match is None:
            return None
        body = text[match.end():]
    elif len(text) < _BASE64_MIN_CHARS:
        return None
    else:
        body = text
    try:
        return base64.b64decode("".join(body.split()), validate=True) or None
    except (ValueError, binascii.Error):
        return None


def _image_from_bytes(data: bytes) -> np.ndarray:
    Image, _ = _pil()
    try:
        with Image.open(io.BytesIO(data)) as opened:
            _check_declared_size(opened, f"image bytes {_describe(data)}")
            return _decoded_to_rgb(opened)
    except DgemmaError:
        raise
    except Exception as e:  # decoders raise many types (OSError, SyntaxError, struct.error, ...)
        raise DgemmaError(f"cannot decode image bytes {_describe(data)}: {e}") from None


def _check_declared_size(opened: Any, what: str) -> None:
    """Refuse an opened (not yet decoded) image whose header declares more than MAX_DECODED_PIXELS pixels."""
    width, height = opened.size
    if width * height > MAX_DECODED_PIXELS:
        raise DgemmaError(f"{what} declares {width}x{height} pixels ({width * height / 1e6:.0f} Mpx), more than "
                          f"{MAX_DECODED_PIXELS / 1e6:.0f} Mpx; the model sees at most ~2.6 Mpx of an image: scale "
                          f"it down first")


def _decoded_to_rgb(opened: Any) -> np.ndarray:
    # transformers.image_utils.load_image (exif_transpose, convert("RGB")), then the processor's convert_to_rgb.
    # NOTE: convert("RGB") drops an alpha band without compositing; a transparent colour key (palette or tRNS
    # transparency) survives in info["transparency"], so convert_to_rgb still turns those pixels white.
    _, ImageOps = _pil()
    return _image_from_pil(ImageOps.exif_transpose(opened).convert("RGB"))


def _image_from_pil(image: Any) -> np.ndarray:
    # transformers.image_transforms.convert_to_rgb for PIL images.
    Image, _ = _pil()
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, rgba).convert("RGB")
        else:
            rgb = image.convert("RGB")
    except Exception as e:  # a lazily loaded, truncated or corrupt file surfaces here
        raise DgemmaError(f"cannot convert PIL image {_describe(image)} to RGB: {e}") from None
    return _checked_rgb(np.array(rgb), image)


def _checked_rgb(rgb: np.ndarray, source: Any) -> np.ndarray:
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise DgemmaError(f"image {_describe(source)} is empty ({rgb.shape[0]}x{rgb.shape[1]} pixels)")
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def _tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.device.type == "meta":
        raise DgemmaError(f"image {_describe(tensor)} is on the meta device (a tensor without data): expected a "
                          f"tensor on the CPU or a GPU")
    if tensor.layout != torch.strided:
        raise DgemmaError(f"image {_describe(tensor)} is a {str(tensor.layout).removeprefix('torch.')} tensor; "
                          f"expected a dense one (tensor.to_dense())")
    if tensor.dtype not in _IMAGE_DTYPES:
        raise DgemmaError(f"image {_describe(tensor)} has an unsupported dtype; expected uint8, another integer "
                          f"type with values in [0, 255], or float with values in [0, 1]")
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds every bfloat16 value exactly
        tensor = tensor.float()
    return tensor.numpy()


# The tensor dtypes an image may have (what numpy holds as integers or floats; bfloat16 through float32).
_IMAGE_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
                 torch.float32, torch.float64) + tuple(getattr(torch, f"uint{n}") for n in (16, 32, 64)
                                                   if hasattr(torch, f"uint{n}"))


def _image_from_array(array: np.ndarray, layout: str | None, source: Any) -> np.ndarray:
    if array.dtype == np.bool_ or not (np.issubdtype(array.dtype, np.integer)
                                       or np.issubdtype(array.dtype, np.floating)):
        raise DgemmaError(f"image {_describe(source)} has an unsupported dtype; expected uint8, another integer "
                          f"type with values in [0, 255], or float with values in [0, 1]")
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3:
        if layout is None:
            layout = _guess_layout(array.shape, source)
        if layout == "CHW":
            array = np.moveaxis(array, 0, -1)
    else:
        raise DgemmaError(f"image {_describe(source)} has {array.ndim} dimensions; expected (H, W), (H, W, C) or "
                          f"(C, H, W)")
    height, width, channels = array.shape
    if channels not in (1, 3, 4):
        raise DgemmaError(f"image {_describe(source)} has {channels} channels in layout {layout}; expected 1 "
                          f"(grey), 3 (RGB) or 4 (RGBA)")
    if height == 0 or width == 0:
        raise DgemmaError(f"image {_describe(source)} is empty ({height}x{width} pixels)")
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise DgemmaError(f"image {_describe(source)} has values in [{low}, {high}]; integer images must be "
                              f"in [0, 255]")
        return _composite_integer(array.astype(np.uint8, copy=False))
    if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
        raise DgemmaError(f"image {_describe(source)} has values in [{array.min()}, {array.max()}]; float images "
                          f"must be finite and in [0, 1]")
    return _quantise_float(_composite_float(array))


def _guess_layout(shape: tuple[int, ...], source: Any) -> str:
    # transformers.image_utils.infer_channel_dimension_format(num_channels=(1, 3, 4)): channels-first wins ties.
    if shape[0] in (1, 3, 4):
        return "CHW"
    if shape[2] in (1, 3, 4):
        return "HWC"
    raise DgemmaError(f"cannot find the channel axis of image {_describe(source)}; expected 1, 3 or 4 channels "
                      f"on the first or last axis")


def _composite_integer(array: np.ndarray) -> np.ndarray:
    if array.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(array, 3, axis=2))
    if array.shape[2] == 3:
        return np.ascontiguousarray(array)
    # Same float64 expression and round-half-to-even as transformers' convert_to_rgb for integer RGBA arrays.
    alpha = array[..., 3:4] / 255
    composite = alpha * array[..., :3] + (1 - alpha) * 255
    return np.ascontiguousarray(np.round(composite).astype(np.uint8))


def _composite_float(array: np.ndarray) -> np.ndarray:
    if array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    if array.shape[2] == 3:
        return array
    # transformers' convert_to_rgb for float RGBA arrays, computed in the array's own float type.
    alpha = array[..., 3:4] / 1.0
    composite = alpha * array[..., :3] + (1 - alpha) * 1.0
    return composite.astype(array.dtype)


def _quantise_float(array: np.ndarray) -> np.ndarray:
    # transformers.image_transforms.to_pil_image(do_rescale=True): float64 * 255, float32, then a truncating cast.
    scaled = (array.astype(np.float64) * 255).astype(np.float32)
    return np.ascontiguousarray(scaled.astype(np.uint8))


def aspect_ratio_preserving_size(height: int, width: int, *, max_soft_tokens: int = DEFAULT_IMAGE_SOFT_TOKENS,
                                 patch_size: int = PATCH_SIZE,
                                 pooling_kernel_size: int = POOLING_KERNEL_SIZE) -> tuple[int, int]:
    """The ``(height, width)`` an image is resized to: the largest multiples of ``patch_size * pooling_kernel_size``
    near the original aspect ratio with at most ``max_soft_tokens * pooling_kernel_size**2`` patches (same float
    arithmetic as transformers' ``get_aspect_ratio_preserving_size``)."""
    height = _check_int("height", height)
    width = _check_int("width", width)
    max_soft_tokens = _check_budget(max_soft_tokens)
    patch_size = _check_int("patch_size", patch_size)
    pooling_kernel_size = _check_int("pooling_kernel_size", pooling_kernel_size)
    max_patches = max_soft_tokens * pooling_kernel_size**2
    target_px = max_patches * patch_size**2
    factor = math.sqrt(target_px / (height * width))
    side = pooling_kernel_size * patch_size
    target_height = int(math.floor(factor * height / side)) * side
    target_width = int(math.floor(factor * width / side)) * side
    # NOTE: both sides cannot round to 0 (that needs height * width * factor**2 = target_px < side**2), and the
    # result never exceeds the budget, so transformers' two ValueErrors are unreachable for supported budgets.
    max_side = (max_patches // pooling_kernel_size**2) * side
    if target_height == 0:
        target_height = side
        target_width = min(int(math.floor(width / height)) * side, max_side)
    elif target_width == 0:
        target_width = side
        target_height = min(int(math.floor(height / width)) * side, max_side)
    return target_height, target_width


def num_image_soft_tokens(height: int, width: int, *, max_soft_tokens: int = DEFAULT_IMAGE_SOFT_TOKENS,
                          patch_size: int = PATCH_SIZE, pooling_kernel_size: int = POOLING_KERNEL_SIZE) -> int:
    """Soft tokens of a ``height`` x ``width`` image (Gemma4Processor's ``_get_num_multimodal_tokens``)."""
    target_height, target_width = aspect_ratio_preserving_size(
        height, width, max_soft_tokens=max_soft_tokens, patch_size=patch_size,
        pooling_kernel_size=pooling_kernel_size)
    return (target_height // patch_size) * (target_width // patch_size) // pooling_kernel_size**2


@dataclass(frozen=True, eq=False)
class ImageInputs:
    """Preprocessed images, as ``Gemma4ImageProcessorPil(...)(images, return_tensors="pt")`` returns them.

    ``pixel_values``: float32 ``[num_images, max_patches, 3 * patch_size**2]`` in [0, 1]; each row one patch,
    flattened as ``(row in patch, column in patch, RGB channel)``; patches in raster order; rows past an image's
    patches are zeros. ``image_position_ids``: int64 ``[num_images, max_patches, 2]``, each patch's
    ``(x, y) = (column, row)`` in the patch grid, ``(-1, -1)`` for padding. ``max_patches`` is
    ``max_soft_tokens * pooling_kernel_size**2``. ``num_soft_tokens_per_image``: the soft tokens (placeholders)
    each image takes in the prompt, ``real patches // pooling_kernel_size**2``.
    """

    pixel_values: torch.Tensor
    image_position_ids: torch.Tensor
    num_soft_tokens_per_image: tuple[int, ...]


def _image_list(images: Any) -> list[Any]:
    if isinstance(images, (list, tuple)):
        items = list(images)
    elif isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        items = list(images)  # a batch of images, as transformers reads a 4-D array
    else:
        items = [images]
    if not items:
        raise DgemmaError("no images given; expected at least one")
    return items


def _patch_positions(patch_rows: int, patch_cols: int) -> np.ndarray:
    # (x, y) per patch in raster order: np.meshgrid(arange(cols), arange(rows), indexing="xy") flattened.
    cols = np.tile(np.arange(patch_cols, dtype=np.int64), patch_rows)
    rows = np.repeat(np.arange(patch_rows, dtype=np.int64), patch_cols)
    return np.stack([cols, rows], axis=-1)


def preprocess_images(images: ImageLike | Sequence[ImageLike], *,
                      max_soft_tokens: int = DEFAULT_IMAGE_SOFT_TOKENS, layout: str | None = None,
                      patch_size: int = PATCH_SIZE, pooling_kernel_size: int = POOLING_KERNEL_SIZE) -> ImageInputs:
    """Resize, rescale and patchify images as transformers' ``Gemma4ImageProcessorPil`` does.

    ``images``: one image or a list of images in any form :func:`load_image` accepts (a 4-D array is a batch);
    ``layout`` is passed to :func:`load_image` for arrays and tensors.
    ``max_soft_tokens``: the visual token budget per image, one of 70, 140, 280, 560, 1120.

    Each image is resized (aspect-preserving, to :func:`aspect_ratio_preserving_size`) with Pillow's bicubic
    filter, skipped when the size already matches, then scaled to [0, 1] as ``float32(float64(x) * (1/255))``,
    cut into ``patch_size`` x ``patch_size`` patches and padded to ``max_patches`` rows. The result is bit-equal
    to the reference; see :class:`ImageInputs` for shapes, dtypes and padding.
    """
    max_soft_tokens = _check_budget(max_soft_tokens)
    patch_size = _check_int("patch_size", patch_size)
    pooling_kernel_size = _check_int("pooling_kernel_size", pooling_kernel_size)
    items = _image_list(images)
    max_patches = max_soft_tokens * pooling_kernel_size**2
    pixel_values = np.zeros((len(items), max_patches, 3 * patch_size**2), dtype=np.float32)
    positions = np.full((len(items), max_patches, 2), -1, dtype=np.int64)
    num_soft_tokens = []
    for i, item in enumerate(items):
        rgb = load_image(item, layout=layout)
        height, width = rgb.shape[:2]
        target = aspect_ratio_preserving_size(height, width, max_soft_tokens=max_soft_tokens,
                                              patch_size=patch_size, pooling_kernel_size=pooling_kernel_size)
        if target != (height, width):
            rgb = _pil_bicubic_resize(rgb, *target)
        values = (rgb.astype(np.float64) * (1 / 255)).astype(np.float32)
        patches = _patchify(values, patch_size)
        pixel_values[i, : len(patches)] = patches
        positions[i, : len(patches)] = _patch_positions(target[0] // patch_size, target[1] // patch_size)
        num_soft_tokens.append(len(patches) // pooling_kernel_size**2)
    return ImageInputs(torch.from_numpy(pixel_values), torch.from_numpy(positions), tuple(num_soft_tokens))


def _pil_bicubic_resize(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    Image, _ = _pil()
    resized = Image.fromarray(rgb).resize((width, height), resample=Image.Resampling.BICUBIC)
    return np.asarray(resized)


def _patchify(values: np.ndarray, patch_size: int) -> np.ndarray:
    """(H, W, C) -> (H/p * W/p, p * p * C): patches in raster order, each flattened as (row, column, channel)."""
    height, width, channels = values.shape
    rows, cols = height // patch_size, width // patch_size
    patches = values.reshape(rows, patch_size, cols, patch_size, channels).transpose(0, 2, 1, 3, 4)
    return patches.reshape(rows * cols, patch_size * patch_size * channels)


# --------------------------------------------------------------------------------------------------- video


@dataclass(frozen=True, eq=False)
class Video:
    """Decoded video frames: ``frames`` uint8 RGB ``(T, H, W, 3)`` and each frame's time in seconds."""

    frames: np.ndarray
    timestamps: tuple[float, ...]

    def __post_init__(self) -> None:
        frames = self.frames
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
            raise DgemmaError(f"video frames {_describe(frames)} are not valid; expected a uint8 numpy array of "
                              f"shape (frames, height, width, 3) holding RGB")
        if 0 in frames.shape:
            raise DgemmaError(f"video frames {_describe(frames)} are empty; expected at least one frame of at "
                              f"least 1x1 pixels")
        try:
            timestamps = tuple(float(t) for t in self.timestamps)
        except (TypeError, ValueError):
            raise DgemmaError(f"video timestamps {self.timestamps!r} are not valid; expected seconds as numbers") \
                from None
        if len(timestamps) != len(frames) or not all(math.isfinite(t) and t >= 0 for t in timestamps):
            raise DgemmaError(f"video timestamps {self.timestamps!r} are not valid; expected {len(frames)} finite "
                              f"non-negative times in seconds, one per frame")
        object.__setattr__(self, "timestamps", timestamps)


def sample_frame_indices(total_frames: int, video_fps: float, *, fps: float = 1.0, max_frames: int = 60) -> list[int]:
    """Frames kept when sampling ``fps`` frames per second: ``n = max(1, int(total_frames / video_fps * fps))``
    capped at ``max_frames`` and ``total_frames``, spread as ``i * total_frames // n`` (transformers'
    ``default_sample_indices_fn`` with ``fps``, or with ``num_frames=n`` when a cap applies)."""
    total_frames = _check_int("total_frames", total_frames)
    max_frames = _check_int("max_frames", max_frames)
    video_fps = _check_rate("video fps", video_fps)
    fps = _check_rate("fps", fps)
    # NOTE: the ratio capped before int(): an extreme rate makes it overflow to inf.
    count = min(max(1, int(min(total_frames / video_fps * fps, total_frames))), max_frames, total_frames)
    return [i * total_frames // count for i in range(count)]


def _check_rate(name: str, value: Any, unit: str = "frames per second") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or value <= 0:
        raise DgemmaError(f"{name}={value!r} is not valid; expected a positive number of {unit}")
    return float(value)


def load_video(video: str | os.PathLike | bytes, *, fps: float = 1.0, max_frames: int = 60,
               max_seconds: float | None = None) -> Video:
    """Decode a video file (path or encoded bytes) with PyAV, keeping about ``fps`` frames per second.

    At most ``max_frames`` frames are kept (spread evenly over the whole video when the cap applies), see
    :func:`sample_frame_indices`. Frames and timestamps equal ``transformers.video_utils.load_video(path, fps=fps,
    backend="pyav")`` (``num_frames=max_frames`` when capped): the frame count and rate come from the stream
    header (``frames``, ``average_rate``), frame ``i`` is the i-th decoded frame converted to ``rgb24``, and its
    timestamp is ``i / average_rate``. Containers without a frame count in their header (Matroska, WebM) have
    their packets counted instead (transformers fails on them); a stream that ends before a sampled frame keeps
    the frames it reached. URLs are refused: download the file first. ``max_seconds``: refuse, before decoding any
    frame, a video whose last kept frame would be at or past this time (the chat prompt's 60 s).
    """
    fps = _check_rate("fps", fps)
    max_frames = _check_int("max_frames", max_frames)
    if max_seconds is not None:
        max_seconds = _check_rate("max_seconds", max_seconds, "seconds")
    if isinstance(video, (str, os.PathLike)):
        name = os.fsdecode(os.fspath(video))
        if _is_url(name):
            raise DgemmaError(f"video {name[:120]!r} is a URL; dgemma does not fetch videos: download it first and "
                              f"pass the file path or its bytes")
        if not os.path.isfile(name):
            raise DgemmaError(f"video file {name!r} does not exist" if not os.path.exists(name)
                              else f"video path {name!r} is not a file")
        source: Any = name
    elif isinstance(video, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(video))
    else:
        raise DgemmaError(f"cannot use {_describe(video)} as a video; expected a file path or encoded video bytes")
    av = _av()

    def open_container():
        if isinstance(source, io.BytesIO):
            source.seek(0)
        return av.open(source)

    try:
        return _decode_sampled(open_container, fps, max_frames, video, max_seconds)
    except DgemmaError:
        raise
    except Exception as e:  # FFmpeg errors (av.FFmpegError, an OSError) and malformed streams
        raise DgemmaError(f"cannot decode video {_describe(video)}: {e}") from None


def _decode_sampled(open_container, fps: float, max_frames: int, video: Any, max_seconds: float | None) -> Video:
    with open_container() as container:
        if not container.streams.video:
            raise DgemmaError(f"video {_describe(video)} has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise DgemmaError(f"video {_describe(video)} does not state its frame rate")
        video_fps = float(rate)
        total = int(stream.frames)
        counted = total <= 0
        if counted:  # no frame count in the header: the packets counted (the container is opened again to decode)
            total = sum(1 for packet in container.demux(stream) if packet.size > 0)
            if total <= 0:
                raise DgemmaError(f"video {_describe(video)} has no frames")
        indices = sample_frame_indices(total, video_fps, fps=fps, max_frames=max_frames)
        if max_seconds is not None and indices[-1] / video_fps >= max_seconds:
            raise DgemmaError(f"video {_describe(video)} is {total / video_fps:.0f} s long; the model takes videos "
                              f"of at most {max_seconds:.0f} seconds ({fps:g} frame per second): trim it first")
        if not counted:
            return _decode_frames(container, stream, indices, video_fps, video)
    # NOTE: reopened rather than rewound: raw streams (an .h264 elementary stream) cannot seek.
    with open_container() as container:
        return _decode_frames(container, container.streams.video[0], indices, video_fps, video)


def _decode_frames(container: Any, stream: Any, indices: list[int], video_fps: float, video: Any) -> Video:
    wanted = set(indices)
    frames, kept = [], []
    for i, frame in enumerate(container.decode(stream)):
        if i > indices[-1]:
            break
        if i in wanted:
            frames.append(frame.to_ndarray(format="rgb24"))
            kept.append(i)
    if not frames:
        raise DgemmaError(f"video {_describe(video)} has no decodable frames")
    return Video(np.stack(frames), tuple(i / video_fps for i in kept))


@dataclass(frozen=True, eq=False)
class VideoInputs:
    """Preprocessed videos, as transformers' ``Gemma4VideoProcessor`` returns them (``return_tensors="pt"``).

    ``pixel_values_videos``: float32 ``[total_frames, max_patches, 3 * patch_size**2]``, the frames of all videos
    concatenated in order; ``video_position_ids``: int64 ``[total_frames, max_patches, 2]``; both laid out and
    padded as in :class:`ImageInputs`. ``num_frames_per_video`` splits the frame axis back per video;
    ``num_soft_tokens_per_video`` is the soft tokens of one frame of each video; ``timestamps`` each video's
    frame times in seconds (they go into the prompt).
    """

    pixel_values_videos: torch.Tensor
    video_position_ids: torch.Tensor
    num_frames_per_video: tuple[int, ...]
    num_soft_tokens_per_video: tuple[int, ...]
    timestamps: tuple[tuple[float, ...], ...]


def preprocess_video(videos: Video | Sequence[Video], *, max_soft_tokens: int = DEFAULT_VIDEO_SOFT_TOKENS,
                     patch_size: int = PATCH_SIZE, pooling_kernel_size: int = POOLING_KERNEL_SIZE) -> VideoInputs:
    """Resize, rescale and patchify video frames as transformers' ``Gemma4VideoProcessor`` does on the CPU.

    ``videos``: one :class:`Video` (e.g. from :func:`load_video`) or a list of them; their frames are used as
    given (no further sampling). ``max_soft_tokens`` is the budget per frame (default 70, the processor's).

    All frames of a video are resized together, aspect-preserving, with torch's antialiased bicubic kernel on
    uint8 (what torchvision's ``resize`` runs for uint8 CPU tensors; it differs from Pillow's by up to 1 in a
    few pixels), then scaled to [0, 1] as ``float32(x) / float32(255)`` (transformers' fused rescale-normalise).
    The processor running on a GPU resizes in float32 instead; dgemma always follows the CPU path.
    """
    max_soft_tokens = _check_budget(max_soft_tokens)
    patch_size = _check_int("patch_size", patch_size)
    pooling_kernel_size = _check_int("pooling_kernel_size", pooling_kernel_size)
    items = [videos] if isinstance(videos, Video) else list(videos) if isinstance(videos, (list, tuple)) else None
    if not items or not all(isinstance(v, Video) for v in items):
        raise DgemmaError(f"cannot use {_describe(videos)} as videos; expected a Video (see load_video) or a "
                          f"non-empty list of them")
    max_patches = max_soft_tokens * pooling_kernel_size**2
    pixel_values, positions, num_soft_tokens = [], [], []
    for video in items:
        frames = torch.from_numpy(video.frames).permute(0, 3, 1, 2).contiguous()
        height, width = frames.shape[-2:]
        target = aspect_ratio_preserving_size(height, width, max_soft_tokens=max_soft_tokens,
                                              patch_size=patch_size, pooling_kernel_size=pooling_kernel_size)
        if target != (height, width):
            frames = torch.nn.functional.interpolate(frames, size=list(target), mode="bicubic",
                                                     align_corners=False, antialias=True)
        values = frames.to(torch.float32).div_(torch.full((3, 1, 1), 255.0))
        count = len(values)
        rows, cols = target[0] // patch_size, target[1] // patch_size
        patches = values.reshape(count, 3, rows, patch_size, cols, patch_size).permute(0, 2, 4, 3, 5, 1)
        patches = patches.reshape(count, rows * cols, -1)
        padded = torch.zeros((count, max_patches, patches.shape[-1]), dtype=torch.float32)
        padded[:, : rows * cols] = patches
        grid = torch.full((count, max_patches, 2), -1, dtype=torch.int64)
        grid[:, : rows * cols] = torch.from_numpy(_patch_positions(rows, cols))
        pixel_values.append(padded)
        positions.append(grid)
        num_soft_tokens.append(rows * cols // pooling_kernel_size**2)
    return VideoInputs(torch.cat(pixel_values), torch.cat(positions), tuple(len(v.frames) for v in items),
                       tuple(num_soft_tokens), tuple(v.timestamps for v in items))


# --------------------------------------------------------------------------------------------------- prompts


def format_timestamp(seconds: float) -> str:
    """``mm:ss`` as Gemma4Processor writes a frame time (whole seconds, truncated; minutes may exceed 59)."""
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def _soft_token_counts(counts: Any, what: str) -> list[int]:
    if isinstance(counts, ImageInputs):
        counts = counts.num_soft_tokens_per_image
    try:
        values = list(counts)
    except TypeError:
        raise DgemmaError(f"cannot read {what} from {_describe(counts)}; expected ImageInputs or a list of "
                          f"soft-token counts") from None
    return [_check_int(f"{what}[{i}]", n) for i, n in enumerate(values)]


def expand_image_tokens(prompt: str | Sequence[int] | torch.Tensor, images: ImageInputs | Sequence[int], *,
                        tokens: VisionTokens = GEMMA4_VISION_TOKENS) -> str | list[int]:
    """Expand each image placeholder of ``prompt``, in order, to ``boi + image * N + eoi`` (Gemma4Processor).

    ``prompt`` is text (each ``tokens.image`` string is a placeholder; returns text) or token ids (each
    ``tokens.image_id`` is a placeholder; returns a list of ids). ``images`` gives N per image: the
    :class:`ImageInputs` of the same images, or their ``num_soft_tokens_per_image``. Tokenising the expanded
    text equals expanding the tokenised text, as all three vision tokens are special tokens.
    """
    counts = _soft_token_counts(images, "num_soft_tokens_per_image")
    if isinstance(prompt, str):
        pieces = prompt.split(tokens.image)
        _check_placeholders(len(pieces) - 1, len(counts), repr(tokens.image), "images")
        out = [pieces[0]]
        for n, piece in zip(counts, pieces[1:]):
            out += [tokens.boi, tokens.image * n, tokens.eoi, piece]
        return "".join(out)
    ids = _token_id_list(prompt)
    _check_placeholders(ids.count(tokens.image_id), len(counts), f"image token id {tokens.image_id}", "images")
    expanded: list[int] = []
    remaining = iter(counts)
    for token_id in ids:
        if token_id == tokens.image_id:
            expanded += [tokens.boi_id] + [tokens.image_id] * next(remaining) + [tokens.eoi_id]
        else:
            expanded.append(token_id)
    return expanded


def expand_video_tokens(prompt: str, videos: VideoInputs, *, tokens: VisionTokens = GEMMA4_VISION_TOKENS) -> str:
    """Expand each video placeholder of the text ``prompt``, in order, as Gemma4Processor does: per frame
    ``"mm:ss " + boi + video * N + eoi``, frames joined by a space (N from ``videos.num_soft_tokens_per_video``).

    Text only: the timestamps are text that the tokenizer must see together with the prompt around them (the
    first one merges with the text before the placeholder), so expand first, then tokenise.
    """
    if not isinstance(prompt, str):
        raise DgemmaError(f"cannot expand video placeholders in {_describe(prompt)}; expected the prompt text")
    if not isinstance(videos, VideoInputs):
        raise DgemmaError(f"cannot use {_describe(videos)} as videos; expected the VideoInputs of preprocess_video")
    pieces = prompt.split(tokens.video)
    _check_placeholders(len(pieces) - 1, len(videos.timestamps), repr(tokens.video), "videos")
    out = [pieces[0]]
    for n, times, piece in zip(videos.num_soft_tokens_per_video, videos.timestamps, pieces[1:]):
        frame = f"{tokens.boi}{tokens.video * n}{tokens.eoi}"
        out += [" ".join(f"{format_timestamp(t)} {frame}" for t in times), piece]
    return "".join(out)


def _check_placeholders(found: int, given: int, placeholder: str, what: str) -> None:
    if found != given:
        raise DgemmaError(f"the prompt has {found} {placeholder} placeholders but {given} {what} were given; "
                          f"expected one placeholder per {what[:-1]}")


def _token_id_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise DgemmaError(f"token ids {_describe(ids)} are not valid; expected a 1-D integer tensor")
        if ids.device.type == "meta":
            raise DgemmaError(f"token ids {_describe(ids)} are on the meta device (a tensor without data): expected "
                              f"a tensor on the CPU or a GPU")
        return ids.tolist()
    values = list(ids)
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        raise DgemmaError(f"token ids {_describe(ids)} are not valid; expected a sequence of integers")
    return [int(v) for v in values]


def mm_token_type_ids(input_ids: Sequence[int] | torch.Tensor, *,
                      tokens: VisionTokens = GEMMA4_VISION_TOKENS) -> list[int] | torch.Tensor:
    """Per-token modality: 1 at image soft tokens, 2 at video soft tokens, 0 elsewhere (boi/eoi included).

    A tensor (any shape, e.g. a ``[B, T]`` batch) gives an int64 tensor of the same shape; a sequence a list.
    """
    if isinstance(input_ids, torch.Tensor):
        types = torch.zeros_like(input_ids, dtype=torch.int64)
        types[input_ids == tokens.image_id] = IMAGE_TOKEN_TYPE
        types[input_ids == tokens.video_id] = VIDEO_TOKEN_TYPE
        return types
    return [IMAGE_TOKEN_TYPE if t == tokens.image_id else VIDEO_TOKEN_TYPE if t == tokens.video_id
            else TEXT_TOKEN_TYPE for t in _token_id_list(input_ids)]
