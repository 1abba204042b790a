"""Molmo preprocessing: image decoding, overlap-and-resize crops, the token layout and the prompt.

This is a port of the released ``MolmoImageProcessor`` / ``MolmoProcessor`` (hub revision 03d86d0,
crop mode "overlap-and-resize-c2"), parametric in crop size, patch size and overlap margins:

* ``select_tiling`` picks rows x cols <= ``max_crops`` windows of ``crop_window_px`` pixels;
* the image is resized (torch bilinear, antialias, in float32 on [0, 1]) and zero-padded to
  ``rows*window + margins`` x ``cols*window + margins``, normalised with the CLIP mean/std, and cut
  into overlapping square crops; a globally resized copy is prepended as crop 0;
* the token layout is ``<im_start> (tokens_w x <im_patch> + <im_col>) * tokens_h <im_end>`` for the
  global crop, then the same for the stitched crops with the overlap margins removed;
* **mask quirk (replicated):** the per-patch padding masks are those of the crops, followed by a row
  of -1 (``np.pad(img_mask, [[0, 1], [0, 0]], constant_values=-1)``), while the pixel rows are
  ``[global, crops...]``; so every mask row is one crop off and the last crop is marked "partial".
  The model was trained with exactly this, so it is kept. ``replicate_mask_quirk=False`` exists only
  to show (in tests) that undoing it changes the output;
* prompt ``" User: {question} Assistant:"``, image tokens first, BOS (= the EOS token) prepended.

Deviations from the released processor, all documented: images are decoded with bounded memory
(see :class:`DecodeLimits`: huge images are downscaled before cropping), EXIF orientation is applied
(the released processor computes ``exif_transpose`` but then discards it), and transparent images are
composited on white (the released processor drops alpha).

Implementation (fast path, tested bit-identical on the CPU to the earlier numpy implementation):
the pixels go through one torch code path on any device (:func:`crop_pixels`): uint8 -> float32/255
once for both resizes, each resized image normalised in place and written once into its padded
canvas (padding filled with ``(0 - mean) / std``), all crops cut and patchified by one strided copy.
Masks come from the resize geometry (:func:`crop_masks`), token ids and feature positions from the
tiling alone (:func:`token_layout`, cached). ``MolmoPreprocessor.preprocess(..., device=...)`` runs
the pixel work on that device; there the resize is done with explicit taps carrying the CPU kernel's
weights (:func:`resize_bilinear_aa_taps`, ~1e-6 from the host path), because torch's CUDA kernel
positions its taps in float32 and differs by ~2e-4 after normalisation.
"""

from __future__ import annotations

import functools
import io
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import MolmoeConfig
from .tokenizer import MolmoTokenizer


# ====================================================================== image decoding
class ImageDecodeError(ValueError):
    """The image bytes cannot be turned into pixels (empty, corrupt, truncated, unsupported)."""


class ImageTooLargeError(ImageDecodeError):
    """The image declares more pixels than the decoding limits allow."""


@dataclass(frozen=True)
class DecodeLimits:
    """Memory bounds for decoding untrusted images.

    * ``max_side_px``: decoded images are downscaled (aspect kept) so that neither side exceeds this.
      It is larger than any resize target of the crops at max_crops 12 (2800 px at full size), so it
      only changes images that would be downscaled anyway.
    * ``max_decode_pixels``: a non-JPEG image that declares more pixels is refused, because it
      would have to be decoded at full size (about 4 bytes per pixel).
    * ``max_source_pixels``: any image declaring more pixels is refused before decoding. JPEGs up
      to this size are decoded at a reduced scale (libjpeg DCT scaling, 1/2 to 1/8), so a
      20000x20000 JPEG costs a 5000x5000 decode, not 20000x20000.
    """

    max_side_px: int = 4096
    max_decode_pixels: int = 50_000_000
    max_source_pixels: int = 1_000_000_000


DEFAULT_DECODE_LIMITS = DecodeLimits()

# Image.open consults the process-wide Image.MAX_IMAGE_PIXELS; it is raised only while our own
# header check replaces it, under this lock.
_PIL_OPEN_LOCK = threading.Lock()

_EXIF_ORIENTATION_TAG = 0x0112
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


def bounded_size(width: int, height: int, limits: DecodeLimits = DEFAULT_DECODE_LIMITS) -> tuple[int, int]:
    """The (width, height) an image of this size is decoded to under ``limits`` (idempotent)."""
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"zero-size image ({width}x{height})")
    longest = max(width, height)
    if longest <= limits.max_side_px:
        return int(width), int(height)
    scale = limits.max_side_px / longest
    return max(1, min(limits.max_side_px, round(width * scale))), max(
        1, min(limits.max_side_px, round(height * scale))
    )


def _open_header(data: bytes | bytearray | memoryview, limits: DecodeLimits) -> Image.Image:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"image data must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageDecodeError("empty image data (0 bytes)")
    with _PIL_OPEN_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # our own check below replaces PIL's decompression-bomb check
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(bytes(data)))
        except UnidentifiedImageError as e:
            fmt = _sniff_format(bytes(data[:16]))
            if fmt:
                raise ImageDecodeError(
                    f"corrupt {fmt} image: the header cannot be read ({len(data)} bytes)"
                ) from e
            raise ImageDecodeError(f"not a recognised image format ({len(data)} bytes)") from e
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageDecodeError(f"corrupt image header: {e}") from e
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"zero-size image ({width}x{height})")
    if width * height > limits.max_source_pixels:
        raise ImageTooLargeError(
            f"image declares {width}x{height} = {width * height} pixels, over the limit of "
            f"{limits.max_source_pixels}"
        )
    return img


_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8", "JPEG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _sniff_format(head: bytes) -> str | None:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _SIGNATURES:
        if head.startswith(magic):
            return name
    return None


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION_TAG, 1) or 1)
    except Exception:  # malformed EXIF is ignored, as image viewers do
        return 1


def open_image(data: bytes, limits: DecodeLimits = DEFAULT_DECODE_LIMITS) -> Image.Image:
    """The image's header, read and checked (no pixels decoded): what :func:`probe_image_size` and
    :func:`decode_image` take instead of the bytes, so that a caller doing both parses it once.
    Raises like :func:`decode_image`."""
    return _open_header(data, limits)


def probe_image_size(
    data: bytes | Image.Image, limits: DecodeLimits = DEFAULT_DECODE_LIMITS, apply_exif_orientation: bool = True,
    exif_before_pixels_only: bool = False,
) -> tuple[int, int]:
    """(width, height) that :func:`decode_image` will return, read from the header. Use it for
    :func:`tier_token_counts` before preprocessing.

    A PNG may carry its EXIF orientation in an eXIf chunk after the pixel data, and Pillow decodes the
    whole image to read it. ``exif_before_pixels_only=True`` never decodes: such a late chunk is not seen,
    and the size may then differ from the decoded one by a swap of width and height (callers that need the
    exact size check it after decoding). ``data`` may be an image from :func:`open_image`."""
    img = data if isinstance(data, Image.Image) else _open_header(data, limits)
    width, height = img.size
    if exif_before_pixels_only and img.format == "PNG" and "exif" not in img.info:
        apply_exif_orientation = False
    if apply_exif_orientation and _exif_orientation(img) in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return bounded_size(width, height, limits)


def decode_image(
    data: bytes | Image.Image, limits: DecodeLimits = DEFAULT_DECODE_LIMITS, apply_exif_orientation: bool = True
) -> np.ndarray:
    """Decode image bytes (or an image just opened by :func:`open_image`, not yet loaded) to RGB uint8
    [H, W, 3], with bounded memory.

    Handles grayscale, palette, RGBA/LA (composited on white), CMYK, 16-bit and float images.
    Raises :class:`ImageDecodeError` (a ValueError) for empty, corrupt, truncated or unsupported data
    and :class:`ImageTooLargeError` for images over ``limits``.
    """
    img = data if isinstance(data, Image.Image) else _open_header(data, limits)
    width, height = img.size
    target_w, target_h = bounded_size(width, height, limits)
    if (target_w, target_h) != (width, height) and img.format == "JPEG":
        # DCT-domain downscaling while decoding: the result is >= the requested size.
        img.draft(img.mode, (target_w, target_h))
    elif width * height > limits.max_decode_pixels:
        raise ImageTooLargeError(
            f"{img.format} image of {width}x{height} = {width * height} pixels would be decoded at full "
            f"size; the limit is {limits.max_decode_pixels} pixels (JPEGs are decoded at reduced scale)"
        )
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"corrupt or truncated {img.format} image data: {e}") from e
    orientation = _exif_orientation(img) if apply_exif_orientation else 1
    if orientation != 1:
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:
            orientation = 1
    if orientation in _SWAPPING_ORIENTATIONS:
        target_w, target_h = target_h, target_w
    rgb = _to_rgb_image(img)
    if rgb.size != (target_w, target_h):
        rgb = rgb.resize((target_w, target_h), Image.Resampling.BILINEAR)
    return np.array(rgb, dtype=np.uint8)  # writable copy


def _to_rgb_image(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        if mode != "I" or arr.max(initial=0) > 255:
            arr = arr / 257.0  # 16-bit range to 8-bit
        return _gray_array_to_rgb(arr)
    if mode == "F":
        arr = np.asarray(img).astype(np.float64)
        arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
        if arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        return _gray_array_to_rgb(arr)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    try:
        if has_alpha:
            rgba = img.convert("RGBA")
            background = Image.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageDecodeError(f"cannot convert image mode {mode!r} to RGB: {e}") from e


def _gray_array_to_rgb(arr: np.ndarray) -> Image.Image:
    gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([gray] * 3, axis=-1), mode="RGB")


def to_rgb_array(
    image: Any, limits: DecodeLimits = DEFAULT_DECODE_LIMITS, apply_exif_orientation: bool = True
) -> np.ndarray:
    """Accept bytes, a PIL image or an array and return RGB uint8 [H, W, 3] (bounded by ``limits``)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(image, limits, apply_exif_orientation)
    if isinstance(image, Image.Image):
        if apply_exif_orientation:
            try:
                image = ImageOps.exif_transpose(image)
            except Exception:
                pass
        rgb = _to_rgb_image(image)
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise ImageDecodeError(f"image array must be [H, W], [H, W, 3] or [H, W, 4], got {arr.shape}")
        if arr.dtype != np.uint8:
            raise ImageDecodeError(f"image array must be uint8, got {arr.dtype}")
        if arr.shape[0] == 0 or arr.shape[1] == 0:
            raise ImageDecodeError(f"zero-size image ({arr.shape[1]}x{arr.shape[0]})")
        rgb = _to_rgb_image(Image.fromarray(np.ascontiguousarray(arr)))
    else:
        raise TypeError(f"unsupported image type {type(image).__name__}")
    width, height = rgb.size
    target = bounded_size(width, height, limits)
    if target != (width, height):
        rgb = rgb.resize(target, Image.Resampling.BILINEAR)
    return np.array(rgb, dtype=np.uint8)  # writable copy


# ====================================================================== crops and layout
def select_tiling(height: float, width: float, window_px: int, max_crops: int) -> tuple[int, int]:
    """Official ``select_tiling``: the (rows, cols) tiling with rows*cols <= max_crops that needs the
    least upscaling, or, if every tiling needs downscaling, the least downscaling (ties favour fewer
    crops, then fewer rows)."""
    tilings = [(i, j) for i in range(1, max_crops + 1) for j in range(1, max_crops + 1) if i * j <= max_crops]
    tilings.sort(key=lambda x: (x[0] * x[1], x[0]))
    candidate_tilings = np.array(tilings, dtype=np.int32)
    candidate_resolutions = candidate_tilings * window_px
    original_size = np.stack([height, width]).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        required_scale_d = candidate_resolutions.astype(np.float32) / original_size
    required_scale = np.min(required_scale_d, axis=-1, keepdims=True)
    if np.all(required_scale < 1):
        ix = np.argmax(required_scale)
    else:
        required_scale = np.where(required_scale < 1.0, 10e9, required_scale)
        ix = np.argmin(required_scale)
    return int(candidate_tilings[ix][0]), int(candidate_tilings[ix][1])


@dataclass(frozen=True)
class ImageLayout:
    """What one image becomes for a given max_crops (computable from the image size alone)."""

    tiling: tuple[int, int]  # (rows, cols) of overlapping crops
    num_crops: int  # crops through the ViT, global crop included: 1 + rows*cols
    num_patch_tokens: int  # <im_patch> tokens, i.e. pooled image features added to the LLM input
    num_image_tokens: int  # all LLM positions of the image: patches + <im_col> + <im_start>/<im_end>


@functools.lru_cache(maxsize=4096)
def image_layout(width: int, height: int, config: MolmoeConfig, max_crops: int) -> ImageLayout:
    """Layout of an image that is ``width`` x ``height`` pixels *as decoded* (see
    :func:`bounded_size` / :func:`probe_image_size`); cached (a pure function of its arguments)."""
    if max_crops < 1:
        raise ValueError(f"max_crops must be >= 1, got {max_crops}")
    left, right = config.overlap_margins
    patch = config.patch_size_px
    window_patches = config.crop_patches - (left + right)
    margin_px = patch * (left + right)
    rows, cols = select_tiling(height - margin_px, width - margin_px, window_patches * patch, max_crops)
    side = config.tokens_per_crop_side
    h_patches = rows * window_patches + left + right
    w_patches = cols * window_patches + left + right
    tok_h, tok_w = (h_patches + 1) // 2, (w_patches + 1) // 2
    global_tokens = side * (side + 1) + 2
    crop_tokens = tok_h * (tok_w + 1) + 2
    return ImageLayout(
        tiling=(rows, cols),
        num_crops=1 + rows * cols,
        num_patch_tokens=side * side + tok_h * tok_w,
        num_image_tokens=global_tokens + crop_tokens,
    )


def tier_token_counts(
    width: int,
    height: int,
    max_crops_list: Sequence[int],
    config: MolmoeConfig | None = None,
    limits: DecodeLimits = DEFAULT_DECODE_LIMITS,
) -> list[tuple[int, int]]:
    """For each max_crops value: (num_crops, num_image_tokens) this image would give, from its size
    alone (no pixels). ``num_crops`` counts ViT crops including the global one; ``num_image_tokens``
    counts every LLM position the image occupies. ``width``/``height`` are the displayed size (use
    :func:`probe_image_size` on raw bytes); the decode limits are applied here as in decoding.
    ``config`` defaults to the full-size model."""
    cfg = config or MolmoeConfig.full()
    w, h = bounded_size(int(width), int(height), limits)
    out = []
    for mc in max_crops_list:
        lay = image_layout(w, h, cfg, int(mc))
        out.append((lay.num_crops, lay.num_image_tokens))
    return out


# ---------------------------------------------------------------------- crop geometry (sizes only)
@dataclass(frozen=True)
class PadGeometry:
    """A resized image inside its zero-padded canvas (the official ``resize_and_pad``), in pixels."""

    canvas_hw: tuple[int, int]  # (height, width) of the padded canvas
    scaled_hw: tuple[int, int]  # (height, width) the image is resized to (aspect kept)
    offset_yx: tuple[int, int]  # (top, left) of the resized image in the canvas (centred)


def pad_geometry(height: int, width: int, desired_hw: tuple[int, int]) -> PadGeometry:
    """Official ``resize_and_pad`` sizes for an image of ``height`` x ``width`` pixels: the scale is
    computed in float32 exactly as there, the resized image is centred in ``desired_hw``."""
    desired_h, desired_w = int(desired_hw[0]), int(desired_hw[1])
    scale_y = np.array(desired_h, np.float32) / np.array(height, np.float32)
    scale_x = np.array(desired_w, np.float32) / np.array(width, np.float32)
    scale = min(scale_x, scale_y)
    scaled_h = max(1, int(np.array(height, np.float32) * scale))
    scaled_w = max(1, int(np.array(width, np.float32) * scale))
    return PadGeometry(
        canvas_hw=(desired_h, desired_w),
        scaled_hw=(scaled_h, scaled_w),
        offset_yx=((desired_h - scaled_h) // 2, (desired_w - scaled_w) // 2),
    )


@dataclass(frozen=True)
class CropPlan:
    """Where every crop of one image comes from at one max_crops (computable from the size alone).

    Crop 0 is the global crop: the image resized into ``global_pad`` (``crop_px`` square). Crops
    1..rows*cols are ``crop_px`` squares cut row-major from the ``tiled_pad`` canvas at multiples of
    ``window_px`` (so neighbours overlap by the margins).
    """

    tiling: tuple[int, int]  # (rows, cols)
    crop_px: int
    patch_px: int
    window_px: int
    tiled_pad: PadGeometry
    global_pad: PadGeometry

    @property
    def num_crops(self) -> int:
        return 1 + self.tiling[0] * self.tiling[1]

    @property
    def crop_patches(self) -> int:
        """Patches per side of one crop."""
        return self.crop_px // self.patch_px


@functools.lru_cache(maxsize=4096)
def crop_plan(height: int, width: int, config: MolmoeConfig, max_crops: int) -> CropPlan:
    """The :class:`CropPlan` of a ``height`` x ``width`` RGB image (as decoded); cached."""
    patch = config.patch_size_px
    left, right = config.overlap_margins
    margin_px = patch * (left + right)
    window_px = (config.crop_patches - (left + right)) * patch
    rows, cols = select_tiling(height - margin_px, width - margin_px, window_px, max_crops)
    canvas_hw = (rows * window_px + margin_px, cols * window_px + margin_px)
    crop = config.crop_size_px
    return CropPlan(
        tiling=(rows, cols),
        crop_px=crop,
        patch_px=patch,
        window_px=window_px,
        tiled_pad=pad_geometry(height, width, canvas_hw),
        global_pad=pad_geometry(height, width, (crop, crop)),
    )


# ---------------------------------------------------------------------- masks (from the geometry)
def _pixels_on_image(
    pad: PadGeometry, axis: int, origins_px: np.ndarray, n_patches: int, patch_px: int
) -> np.ndarray:
    """int64 [len(origins_px), n_patches]: for crops starting at ``origins_px`` along ``axis``
    (0 = rows, 1 = columns) of the canvas, how many pixel rows/columns of each patch band lie on
    the resized image rather than on the padding."""
    lo = pad.offset_yx[axis]
    hi = lo + pad.scaled_hw[axis]
    start = origins_px[:, None] + patch_px * np.arange(n_patches, dtype=np.int64)[None, :]
    return np.clip(np.minimum(start + patch_px, hi) - np.maximum(start, lo), 0, None)


def _patch_fill_fractions(
    pad: PadGeometry, origins_y_px: np.ndarray, origins_x_px: np.ndarray, n_patches_side: int, patch_px: int
) -> np.ndarray:
    """float32 [len(origins_y_px) * len(origins_x_px), n_patches_side**2]: the fraction of real
    (non-padding) pixels of every patch of every crop (row-major crops, row-major patches); equal
    to patchifying the padding mask and averaging it."""
    on_y = _pixels_on_image(pad, 0, origins_y_px, n_patches_side, patch_px)  # [ny, s]
    on_x = _pixels_on_image(pad, 1, origins_x_px, n_patches_side, patch_px)  # [nx, s]
    counts = on_y[:, None, :, None] * on_x[None, :, None, :]  # [ny, nx, s(h), s(w)]
    counts = counts.reshape(len(origins_y_px) * len(origins_x_px), n_patches_side * n_patches_side)
    return counts.astype(np.float32) / np.float32(patch_px * patch_px)


def crop_masks(plan: CropPlan, replicate_mask_quirk: bool = True) -> np.ndarray:
    """float32 [n_crops, n_patches] per-patch fraction of real pixels, in the model's row order.

    With the quirk (what the model was trained with): the masks of crops 1.. followed by a row of
    -1, i.e. one crop off the pixels. Without it: the global crop's mask, then the crops'."""
    rows, cols = plan.tiling
    s, p = plan.crop_patches, plan.patch_px
    origins_y = np.arange(rows, dtype=np.int64) * plan.window_px
    origins_x = np.arange(cols, dtype=np.int64) * plan.window_px
    tiled = _patch_fill_fractions(plan.tiled_pad, origins_y, origins_x, s, p)
    if replicate_mask_quirk:
        return np.concatenate([tiled, np.full((1, s * s), -1, np.float32)], 0)
    zero = np.zeros(1, np.int64)
    return np.concatenate([_patch_fill_fractions(plan.global_pad, zero, zero, s, p), tiled], 0)


# ---------------------------------------------------------------------- pixels (torch, any device)
@dataclass(frozen=True)
class Normalisation:
    """Per-channel constants on one device: float32 [3] each."""

    mean: torch.Tensor
    std: torch.Tensor
    pad_value: torch.Tensor  # what a zero (padding) pixel becomes: (0 - mean) / std

    @classmethod
    def build(cls, config: MolmoeConfig, device: torch.device | str = "cpu") -> Normalisation:
        mean = torch.tensor(config.image_mean, dtype=torch.float32, device=device)
        std = torch.tensor(config.image_std, dtype=torch.float32, device=device)
        return cls(mean=mean, std=std, pad_value=(torch.zeros_like(mean) - mean) / std)


def unit_float_image(image_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [1, 3, H, W] on [0, 1], a channels-last strided view (the official
    code's exact ops and memory layout, which the resize kernel's rounding could depend on)."""
    if image_u8.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image, got {image_u8.dtype}")
    return image_u8.permute(2, 0, 1).to(torch.float32).div_(255.0)[None]


def resize_bilinear_aa(image01: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """float32 [1, 3, H, W] -> [3, h, w]: torch's bilinear antialiased resize, the released
    processor's op (the host path; bit-identical to it on the CPU)."""
    return F.interpolate(image01, size=size_hw, mode="bilinear", align_corners=False, antialias=True)[0]


def resize_bilinear_aa_taps(image01: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """float32 [1, 3, H, W] on any device -> [3, h, w]: the same resize as
    :func:`resize_bilinear_aa`, computed as gathers and weighted sums with the weights torch's CPU
    kernel uses (:func:`aa_bilinear_taps`): width first, then height, an unchanged axis skipped.

    Equal to the CPU kernel up to float summation order (~1e-7). torch's own CUDA kernel is not
    used because it places its taps in float32 and differs by up to ~5e-5 (2e-4 after
    normalisation) at 1000-px canvases. Kept quirk: for an output 1 px wide whose height changes,
    torch's CPU kernel repeats the first row's value down the column; that case (only images over
    ~168:1) runs the CPU kernel itself on the (thin) image."""
    _, _, in_h, in_w = image01.shape
    out_h, out_w = int(size_hw[0]), int(size_hw[1])
    if out_w == 1 and out_h != in_h:
        return resize_bilinear_aa(image01.cpu(), (out_h, out_w)).to(image01.device)
    x = image01[0]
    if (out_h, out_w) == (in_h, in_w):
        return x.clone()  # callers normalise the result in place
    if out_w != in_w:
        x = _resample_axis(x, 2, *_device_taps(in_w, out_w, x.device))
    if out_h != in_h:
        x = _resample_axis(x, 1, *_device_taps(in_h, out_h, x.device))
    return x


@functools.lru_cache(maxsize=1024)
def aa_bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Taps of torch's CPU antialiased bilinear resize along one axis, tap-major: int64 source
    indices [taps, out_size] (clamped to the axis) and float32 weights [taps, out_size] (0 beyond
    an output's support). Mirrors ``_compute_indices_min_size_weights_aa`` for float32 input,
    including its float32/float64 promotions (centre rounded to float32, offsets in float64)."""
    scale = np.float32(in_size) / np.float32(out_size)
    support = np.float32(scale) if scale >= 1.0 else np.float32(1.0)
    taps = int(np.ceil(support)) * 2 + 1
    invscale = np.float32(1.0 / np.float64(scale)) if scale >= 1.0 else np.float32(1.0)
    center = (np.float64(scale) * (np.arange(out_size, dtype=np.float64) + 0.5)).astype(np.float32)
    xmin = np.maximum(((center - support).astype(np.float64) + 0.5).astype(np.int64), 0)
    xend = np.minimum(((center + support).astype(np.float64) + 0.5).astype(np.int64), in_size)
    xsize = np.clip(xend - xmin, 0, taps)
    j = np.arange(taps, dtype=np.int64)
    src = xmin[:, None] + j[None, :]  # [out, taps]
    offset = src.astype(np.float32) - center[:, None]
    arg = np.abs(((offset.astype(np.float64) + 0.5) * np.float64(invscale)).astype(np.float32))
    weight = np.where(arg < 1.0, (1.0 - arg.astype(np.float64)).astype(np.float32), np.float32(0.0))
    weight = np.where(j[None, :] < xsize[:, None], weight, np.float32(0.0)).astype(np.float32)
    total = weight[:, 0].copy()
    for k in range(1, taps):  # the kernel's sequential float32 sum
        total += weight[:, k]
    weight = np.divide(weight, total[:, None], out=weight.copy(), where=total[:, None] != 0)
    used = max(1, int(xsize.max()))  # the kernel's tap budget can exceed every output's support
    idx = np.ascontiguousarray(np.minimum(src, in_size - 1)[:, :used].T)
    weight = np.ascontiguousarray(weight[:, :used].T)
    idx.flags.writeable = weight.flags.writeable = False
    return idx, weight


@functools.lru_cache(maxsize=512)
def _device_taps(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`aa_bilinear_taps` as tensors on ``device`` (cached; never handed to callers)."""
    idx, weight = aa_bilinear_taps(in_size, out_size)
    return torch.tensor(idx, device=device), torch.tensor(weight, device=device)


_GATHER_BUDGET_ELEMENTS = 1 << 24  # bounds the gathered intermediate (64 MiB of float32)


def _resample_axis(x: torch.Tensor, dim: int, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Resample [3, H, W] along ``dim`` (1 or 2) with tap-major ``idx``/``weight`` [taps, out]:
    out[..., o, ...] = sum_t weight[t, o] * x[..., idx[t, o], ...], taps gathered in chunks."""
    taps, n_out = idx.shape
    per_tap = x.numel() // x.shape[dim] * n_out
    chunk = max(1, _GATHER_BUDGET_ELEMENTS // max(1, per_tap))
    trailing = (1,) * (x.dim() - 1 - dim)
    out = None
    for t0 in range(0, taps, chunk):
        t1 = min(taps, t0 + chunk)
        gathered = x.index_select(dim, idx[t0:t1].reshape(-1)).unflatten(dim, (t1 - t0, n_out))
        part = (gathered * weight[t0:t1].view(t1 - t0, n_out, *trailing)).sum(dim)
        out = part if out is None else out.add_(part)
    return out


def normalised_canvas(
    image01: torch.Tensor, pad: PadGeometry, norm: Normalisation, resize=resize_bilinear_aa
) -> torch.Tensor:
    """float32 [1, 3, H, W] on [0, 1] -> float32 [canvas_h, canvas_w, 3]: resized (bilinear,
    antialias, by ``resize``), clipped to [0, 1], zero-padded and normalised ``(x - mean) / std``,
    all in float32.

    The resized image is normalised in place in its own [3, h, w] layout (vectorised per channel),
    then written once, interleaved, into the canvas; the padding is filled with ``norm.pad_value``
    (the same float32 ops applied to 0), so no padded intermediate is made."""
    scaled_h, scaled_w = pad.scaled_hw
    resized = resize(image01, (scaled_h, scaled_w))
    per_channel = (-1, 1, 1)
    resized.clamp_(0.0, 1.0).sub_(norm.mean.view(per_channel)).div_(norm.std.view(per_channel))
    canvas_h, canvas_w = pad.canvas_hw
    top, left = pad.offset_yx
    canvas = torch.empty((canvas_h, canvas_w, 3), dtype=torch.float32, device=image01.device)
    canvas[top : top + scaled_h, left : left + scaled_w].copy_(resized.permute(1, 2, 0))
    _fill_padding(canvas, pad, norm.pad_value)
    return canvas


def _fill_padding(canvas: torch.Tensor, pad: PadGeometry, value: torch.Tensor) -> None:
    """Write ``value`` [3] into the canvas [H, W, 3] outside the resized image."""
    top, left = pad.offset_yx
    bottom, right = top + pad.scaled_hw[0], left + pad.scaled_hw[1]
    for region in (canvas[:top], canvas[bottom:], canvas[top:bottom, :left], canvas[top:bottom, right:]):
        if region.numel():
            region.copy_(value.expand_as(region))


def patch_windows(
    canvas: torch.Tensor, grid_rc: tuple[int, int], stride_px: int, crop_px: int, patch_px: int
) -> torch.Tensor:
    """View of ``grid_rc`` = (rows, cols) square crops of ``crop_px`` cut from canvas [H, W, 3] every
    ``stride_px`` pixels, patchified: [rows, cols, s, s, p, p, 3] in (h, w, dh, dw, c) order, with
    s = crop_px / patch_px and p = patch_px. No copy is made."""
    rows, cols = grid_rc
    s = crop_px // patch_px
    win = canvas.unfold(0, crop_px, stride_px).unfold(1, crop_px, stride_px)  # [R', C', 3, y, x]
    win = win[:rows, :cols].unflatten(4, (s, patch_px)).unflatten(3, (s, patch_px))  # R C c h dh w dw
    return win.permute(0, 1, 3, 5, 4, 6, 2)


def crop_pixels(
    image_u8: torch.Tensor, plan: CropPlan, norm: Normalisation, resize=resize_bilinear_aa
) -> torch.Tensor:
    """uint8 [H, W, 3] (on any device) -> normalised float32 [n_crops, n_patches, patch_dim] on the
    same device: crop 0 the global crop, then the tiled crops row-major; (dh, dw, c) per patch.
    ``resize``: :func:`resize_bilinear_aa` (host path) or :func:`resize_bilinear_aa_taps`."""
    s, p, crop = plan.crop_patches, plan.patch_px, plan.crop_px
    rows, cols = plan.tiling
    image01 = unit_float_image(image_u8)
    out = torch.empty((plan.num_crops, s * s, p * p * 3), dtype=torch.float32, device=image_u8.device)
    global_canvas = normalised_canvas(image01, plan.global_pad, norm, resize)
    out[:1].view(1, 1, s, s, p, p, 3).copy_(patch_windows(global_canvas, (1, 1), crop, crop, p))
    tiled_canvas = normalised_canvas(image01, plan.tiled_pad, norm, resize)
    out[1:].view(rows, cols, s, s, p, p, 3).copy_(
        patch_windows(tiled_canvas, (rows, cols), plan.window_px, crop, p)
    )
    return out


# ---------------------------------------------------------------------- tokens (from the tiling)
@dataclass(frozen=True)
class TokenLayout:
    """Token ids and feature positions of one tiling (read-only arrays, shared by every image)."""

    tokens: np.ndarray  # int64 [n_image_tokens]
    patch_ordering: np.ndarray  # int64 [n_crops * tokens_per_crop], -1 = dropped feature
    image_input_idx: np.ndarray  # int64 [n_crops, tokens_per_crop] position in ``tokens``, -100 dropped


def _crop_patch_ordering(config: MolmoeConfig, tiling: tuple[int, int]) -> np.ndarray:
    """Official pooled-feature ordering of the tiled crops: int64 [rows*cols*tokens_per_crop],
    left-to-right over the whole image, -1 for features in the overlap margins."""
    left_margin, right_margin = config.overlap_margins
    base_patches = config.crop_patches
    tok_side = config.tokens_per_crop_side
    ordering_arr = []
    on = 0
    for i in range(tiling[0]):
        crop_y0 = 0 if i == 0 else left_margin // 2
        crop_h = base_patches - (right_margin + left_margin)
        if i == 0:
            crop_h += left_margin
        if i == tiling[0] - 1:
            crop_h += right_margin
        for j in range(tiling[1]):
            crop_x0 = 0 if j == 0 else left_margin // 2
            crop_w = base_patches - (right_margin + left_margin)
            if j == 0:
                crop_w += left_margin
            if j == tiling[1] - 1:
                crop_w += right_margin
            pooled_w = (crop_w + 1) // 2
            pooled_h = (crop_h + 1) // 2
            order = np.full((tok_side, tok_side), -1, dtype=np.int64)
            order[crop_y0 : crop_y0 + pooled_h, crop_x0 : crop_x0 + pooled_w] = np.arange(
                on, on + pooled_h * pooled_w, dtype=np.int64
            ).reshape(pooled_h, pooled_w)
            ordering_arr.append(order)
            on += pooled_h * pooled_w
    patch_ordering = np.stack(ordering_arr).reshape(-1)
    valid = patch_ordering >= 0
    # Transpose to left-to-right order over the whole image instead of crop-by-crop order.
    ordering_rh = (
        patch_ordering.reshape(tiling[0], tiling[1], tok_side, tok_side).transpose(0, 2, 1, 3).reshape(-1)
    )
    patch_ordering[valid] = ordering_rh[ordering_rh >= 0]
    return patch_ordering


@functools.lru_cache(maxsize=256)
def token_layout(config: MolmoeConfig, tiling: tuple[int, int]) -> TokenLayout:
    """Official token layout and patch ordering of a tiling (global crop first); cached."""
    cfg = config
    left_margin, right_margin = cfg.overlap_margins
    window_patches = cfg.crop_patches - (left_margin + right_margin)
    tok_side = cfg.tokens_per_crop_side
    tokens_per_image = tok_side * tok_side
    patch_ordering = _crop_patch_ordering(cfg, tiling)
    h = tiling[0] * window_patches + (right_margin + left_margin)
    w = tiling[1] * window_patches + (right_margin + left_margin)
    per_row = np.concatenate([np.full(((w + 1) // 2,), cfg.image_patch_token_id), [cfg.image_col_token_id]])
    crop_tokens = np.tile(per_row, [(h + 1) // 2])
    patch_ordering = np.where(patch_ordering >= 0, patch_ordering + tokens_per_image, -1)
    patch_ordering = np.concatenate([np.arange(0, tokens_per_image), patch_ordering], 0).astype(np.int64)
    per_row = np.concatenate([np.full((tok_side,), cfg.image_patch_token_id), [cfg.image_col_token_id]])
    global_tokens = np.tile(per_row, [tok_side])
    tokens = np.concatenate(
        [
            [cfg.image_start_token_id],
            global_tokens,
            [cfg.image_end_token_id],
            [cfg.image_start_token_id],
            crop_tokens,
            [cfg.image_end_token_id],
        ]
    ).astype(np.int64)
    idx = build_image_input_idx(tokens, patch_ordering, cfg.image_patch_token_id, cfg.tokens_per_crop)
    for arr in (tokens, patch_ordering, idx):
        arr.flags.writeable = False
    return TokenLayout(tokens=tokens, patch_ordering=patch_ordering, image_input_idx=idx)


# ---------------------------------------------------------------------- numpy API (kept)
@dataclass
class ImageCrops:
    crops: np.ndarray  # float32 [n_crops, n_patches, patch_dim]
    tokens: np.ndarray  # int64 [n_image_tokens]
    patch_ordering: np.ndarray  # int64 [n_crops * tokens_per_crop]
    masks: np.ndarray  # float32 [n_crops, n_patches]
    tiling: tuple[int, int]


def image_to_crops(
    image: np.ndarray,
    config: MolmoeConfig,
    max_crops: int,
    replicate_mask_quirk: bool = True,
) -> ImageCrops:
    """Official ``image_to_patches_and_tokens`` for RGB uint8 [H, W, 3] (numpy in, numpy out)."""
    plan = crop_plan(image.shape[0], image.shape[1], config, max_crops)
    pixels = crop_pixels(_host_tensor(image), plan, Normalisation.build(config))
    layout = token_layout(config, plan.tiling)
    return ImageCrops(
        crops=pixels.numpy(),
        tokens=layout.tokens.copy(),
        patch_ordering=layout.patch_ordering.copy(),
        masks=crop_masks(plan, replicate_mask_quirk),
        tiling=plan.tiling,
    )


def _host_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] numpy -> a CPU tensor sharing its memory (copied only if not C-contiguous
    or read-only)."""
    return torch.from_numpy(np.require(image, requirements=["C", "W"]))


def build_image_input_idx(
    image_tokens: np.ndarray, patch_order: np.ndarray, image_patch_token_id: int, tokens_per_crop: int
) -> np.ndarray:
    """Official ``build_image_input_idx``: for each pooled feature (crop-major), the position in
    ``image_tokens`` of its ``<im_patch>`` token, -100 where the feature is dropped (margins)."""
    image_input_idx = np.nonzero(image_tokens == image_patch_token_id)[0].astype(np.int64)
    n_tokens = image_input_idx.shape[0]
    patch_order = np.reshape(patch_order, [-1])
    valid = patch_order >= 0
    n_valid = int(valid.sum())
    if n_tokens != n_valid:
        raise AssertionError(f"{n_tokens} <im_patch> tokens but {n_valid} valid patches")
    sorted_patch_ixs = np.zeros([n_tokens], np.int64)
    sorted_patch_ixs[patch_order[valid]] = np.arange(n_valid, dtype=np.int64)
    sorted_ex = np.full(np.shape(patch_order), -1, dtype=np.int64)
    sorted_ex[valid] = sorted_patch_ixs
    valid_i = (sorted_ex >= 0).astype(np.int64)
    image_input_idx = image_input_idx[sorted_ex * valid_i]
    image_input_idx = image_input_idx * valid_i - 100 * (1 - valid_i)
    return image_input_idx.reshape(-1, tokens_per_crop)


# ====================================================================== the processor
@dataclass
class MolmoInputs:
    """Model inputs for one request (batch size 1, no batch dimension).

    * ``input_ids``: int64 [T] - BOS, image tokens (if any), prompt tokens.
    * ``images``: float32 [n_crops, n_patches, patch_dim] normalised pixels, (dh, dw, c) per patch.
    * ``image_masks``: float32 [n_crops, n_patches] fraction of real pixels per patch (quirk applied).
    * ``image_input_idx``: int64 [n_crops, tokens_per_crop] position in ``input_ids`` that each pooled
      feature is added to; negative = dropped.
    """

    input_ids: torch.Tensor
    images: torch.Tensor | None = None
    image_masks: torch.Tensor | None = None
    image_input_idx: torch.Tensor | None = None
    num_crops: int = 0
    num_patch_tokens: int = 0
    num_image_tokens: int = 0
    tiling: tuple[int, int] | None = None
    image_size: tuple[int, int] | None = None  # (width, height) of the decoded image
    max_crops: int | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> "MolmoInputs":
        def mv(t):
            return None if t is None else t.to(device)

        return MolmoInputs(
            input_ids=self.input_ids.to(device),
            images=mv(self.images),
            image_masks=mv(self.image_masks),
            image_input_idx=mv(self.image_input_idx),
            num_crops=self.num_crops,
            num_patch_tokens=self.num_patch_tokens,
            num_image_tokens=self.num_image_tokens,
            tiling=self.tiling,
            image_size=self.image_size,
            max_crops=self.max_crops,
        )


class MolmoPreprocessor:
    """Question (+ optional image) -> :class:`MolmoInputs`, parametric in the model config."""

    def __init__(
        self,
        config: MolmoeConfig,
        tokenizer: MolmoTokenizer,
        limits: DecodeLimits = DEFAULT_DECODE_LIMITS,
        apply_exif_orientation: bool = True,
    ):
        tokenizer.check_matches(config)
        self.config = config
        self.tokenizer = tokenizer
        self.limits = limits
        self.apply_exif_orientation = apply_exif_orientation
        self._norms: dict[torch.device, Normalisation] = {}

    def prompt_ids(self, question: str) -> list[int]:
        """Token ids of the official "role" prompt ``" User: {question} Assistant:"`` (no BOS)."""
        return self.tokenizer.encode(" User: " + question + " Assistant:")

    def tier_token_counts(
        self, width: int, height: int, max_crops_list: Sequence[int]
    ) -> list[tuple[int, int]]:
        return tier_token_counts(width, height, max_crops_list, self.config, self.limits)

    def image_layout(self, width: int, height: int, max_crops: int) -> ImageLayout:
        w, h = bounded_size(width, height, self.limits)
        return image_layout(w, h, self.config, max_crops)

    def load_image(self, image: Any) -> np.ndarray:
        """bytes / PIL image / uint8 array -> RGB uint8 [H, W, 3] within the decode limits."""
        return to_rgb_array(image, self.limits, self.apply_exif_orientation)

    def preprocess(
        self,
        question: str,
        image: Any = None,
        max_crops: int | None = None,
        replicate_mask_quirk: bool = True,
        device: torch.device | str | None = None,
    ) -> MolmoInputs:
        """Build the model inputs. ``image`` may be bytes, a PIL image, an RGB uint8 array or None.

        ``device=None`` (host path): the pixels are processed on the CPU with torch's resize kernel,
        bit-identical to the released processor's math, and every tensor is returned on the CPU.
        With a torch device (e.g. ``"cuda"``) the decoded uint8 image is uploaded once and resized
        (:func:`resize_bilinear_aa_taps`), normalised, padded and cut there; every returned tensor
        is on that device. Pixels then differ from the host path by float rounding only (<= 1e-5);
        masks, ids and positions are identical (they depend on the image size alone). The device
        path is for accelerators: on a CPU device it runs (that is how it is tested) but is several
        times slower than ``device=None``."""
        cfg = self.config
        text_ids = np.asarray(self.prompt_ids(question), dtype=np.int64)
        bos = np.asarray([self.tokenizer.bos_id], dtype=np.int64)
        if image is None:
            return MolmoInputs(input_ids=_to_device(np.concatenate([bos, text_ids]), device))
        max_crops = int(max_crops if max_crops is not None else cfg.max_crops)
        rgb = image if _is_rgb_array(image) and self._within_limits(image) else self.load_image(image)
        height, width = rgb.shape[:2]
        plan = crop_plan(height, width, cfg, max_crops)
        layout = image_layout(width, height, cfg, max_crops)
        tokens = token_layout(cfg, plan.tiling)
        self._check_layout(layout, plan, tokens)
        image_u8 = _host_tensor(rgb)
        if device is not None:
            image_u8 = image_u8.to(device)
        resize = resize_bilinear_aa if device is None else resize_bilinear_aa_taps
        pixels = crop_pixels(image_u8, plan, self._normalisation(image_u8.device), resize)
        # The image goes first; BOS is prepended, shifting every feature position by one.
        input_ids = np.concatenate([bos, tokens.tokens, text_ids])
        idx = tokens.image_input_idx
        idx = np.where(idx < 0, idx, idx + 1)
        return MolmoInputs(
            input_ids=_to_device(input_ids, device),
            images=pixels,
            image_masks=_to_device(crop_masks(plan, replicate_mask_quirk), device),
            image_input_idx=_to_device(idx, device),
            num_crops=layout.num_crops,
            num_patch_tokens=layout.num_patch_tokens,
            num_image_tokens=layout.num_image_tokens,
            tiling=layout.tiling,
            image_size=(int(width), int(height)),
            max_crops=max_crops,
        )

    def _normalisation(self, device: torch.device) -> Normalisation:
        """The mean/std constants on ``device`` (built once per device)."""
        norm = self._norms.get(device)
        if norm is None:
            norm = self._norms[device] = Normalisation.build(self.config, device)
        return norm

    def _check_layout(self, layout: ImageLayout, plan: CropPlan, tokens: TokenLayout) -> None:
        n_patch_tokens = int((tokens.tokens == self.config.image_patch_token_id).sum())
        if (
            layout.tiling != plan.tiling
            or layout.num_crops != plan.num_crops
            or layout.num_image_tokens != tokens.tokens.shape[0]
            or layout.num_patch_tokens != n_patch_tokens
        ):
            raise AssertionError(f"layout {layout} disagrees with the crop plan {plan}")

    def _within_limits(self, arr: np.ndarray) -> bool:
        h, w = arr.shape[:2]
        return bounded_size(w, h, self.limits) == (w, h)


def _is_rgb_array(x: Any) -> bool:
    return (
        isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 3 and x.shape[-1] == 3 and x.size > 0
    )


def _to_device(arr: np.ndarray, device: torch.device | str | None) -> torch.Tensor:
    """``arr`` as a tensor on ``device`` (on the CPU it shares memory: pass only arrays this request
    owns, never a cached :class:`TokenLayout` array)."""
    t = torch.from_numpy(arr)
    return t if device is None else t.to(device)
