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
"""

from __future__ import annotations

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


def probe_image_size(
    data: bytes, limits: DecodeLimits = DEFAULT_DECODE_LIMITS, apply_exif_orientation: bool = True
) -> tuple[int, int]:
    """(width, height) that :func:`decode_image` will return, read from the header only (no pixels
    are decoded). Use it for :func:`tier_token_counts` before preprocessing."""
    img = _open_header(data, limits)
    width, height = img.size
    if apply_exif_orientation and _exif_orientation(img) in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return bounded_size(width, height, limits)


def decode_image(
    data: bytes, limits: DecodeLimits = DEFAULT_DECODE_LIMITS, apply_exif_orientation: bool = True
) -> np.ndarray:
    """Decode image bytes to RGB uint8 [H, W, 3], with bounded memory.

    Handles grayscale, palette, RGBA/LA (composited on white), CMYK, 16-bit and float images.
    Raises :class:`ImageDecodeError` (a ValueError) for empty, corrupt, truncated or unsupported data
    and :class:`ImageTooLargeError` for images over ``limits``.
    """
    img = _open_header(data, limits)
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


def image_layout(width: int, height: int, config: MolmoeConfig, max_crops: int) -> ImageLayout:
    """Layout of an image that is ``width`` x ``height`` pixels *as decoded* (see
    :func:`bounded_size` / :func:`probe_image_size`)."""
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


def _resize_and_pad(
    image: np.ndarray, desired_hw: tuple[int, int], mean: np.ndarray, std: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Official ``resize_and_pad`` (torch-bilinear, antialias): uint8 [H, W, 3] -> normalised float32
    [h, w, 3] and a bool [h, w] mask of real (non-padding) pixels."""
    desired_h, desired_w = desired_hw
    height, width = image.shape[:2]
    scale_y = np.array(desired_h, np.float32) / np.array(height, np.float32)
    scale_x = np.array(desired_w, np.float32) / np.array(width, np.float32)
    scale = min(scale_x, scale_y)
    scaled_h = max(1, int(np.array(height, np.float32) * scale))
    scaled_w = max(1, int(np.array(width, np.float32) * scale))
    x = (
        torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1).to(torch.float32)
        / 255.0
    )
    x = F.interpolate(
        x[None], size=(scaled_h, scaled_w), mode="bilinear", align_corners=False, antialias=True
    )[0]
    x = torch.clip(x, 0.0, 1.0).permute(1, 2, 0).numpy()
    top = (desired_h - scaled_h) // 2
    left = (desired_w - scaled_w) // 2
    pad = [[top, desired_h - scaled_h - top], [left, desired_w - scaled_w - left], [0, 0]]
    mask = np.pad(np.ones((scaled_h, scaled_w), dtype=bool), pad[:2])
    x = np.pad(x, pad, constant_values=0)
    x = (x - mean[None, None, :]) / std[None, None, :]
    return x.astype(np.float32), mask


def _patchify(arr: np.ndarray, patch: int) -> np.ndarray:
    """[n, H, W, (c)] -> [n, (H/p)*(W/p), p*p*(c)] in (h, w) patch order, (dh, dw, c) pixel order."""
    n, height, width = arr.shape[:3]
    extra = arr.shape[3:]
    x = arr.reshape(n, height // patch, patch, width // patch, patch, *extra)
    x = np.moveaxis(x, 2, 3)  # n, h, w, dh, dw, (c)
    return x.reshape(n, (height // patch) * (width // patch), -1)


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
    """Official ``image_to_patches_and_tokens`` for RGB uint8 [H, W, 3]."""
    cfg = config
    patch = cfg.patch_size_px
    crop_size = cfg.crop_size_px
    base_patches = cfg.crop_patches
    tok_side = cfg.tokens_per_crop_side
    tokens_per_image = tok_side * tok_side
    mean = np.array(cfg.image_mean, np.float32)
    std = np.array(cfg.image_std, np.float32)
    left_margin, right_margin = cfg.overlap_margins
    total_margin_px = patch * (left_margin + right_margin)
    window_patches = base_patches - (left_margin + right_margin)
    window_px = window_patches * patch
    height, width = image.shape[:2]
    tiling = select_tiling(height - total_margin_px, width - total_margin_px, window_px, max_crops)
    src, img_mask = _resize_and_pad(
        image, (tiling[0] * window_px + total_margin_px, tiling[1] * window_px + total_margin_px), mean, std
    )

    patches_arr, mask_arr, ordering_arr = [], [], []
    on = 0
    for i in range(tiling[0]):
        y0 = i * window_px
        crop_y0 = 0 if i == 0 else left_margin // 2
        crop_h = base_patches - (right_margin + left_margin)
        if i == 0:
            crop_h += left_margin
        if i == tiling[0] - 1:
            crop_h += right_margin
        for j in range(tiling[1]):
            x0 = j * window_px
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
            patches_arr.append(src[y0 : y0 + crop_size, x0 : x0 + crop_size])
            mask_arr.append(img_mask[y0 : y0 + crop_size, x0 : x0 + crop_size])
            on += pooled_h * pooled_w

    patches = _patchify(np.stack(patches_arr), patch)
    masks = _patchify(np.stack(mask_arr), patch).astype(np.float32).mean(axis=-1)
    patch_ordering = np.stack(ordering_arr).reshape(-1)
    valid = patch_ordering >= 0
    # Transpose to left-to-right order over the whole image instead of crop-by-crop order.
    ordering_rh = (
        patch_ordering.reshape(tiling[0], tiling[1], tok_side, tok_side).transpose(0, 2, 1, 3).reshape(-1)
    )
    patch_ordering[valid] = ordering_rh[ordering_rh >= 0]

    h = tiling[0] * window_patches + (right_margin + left_margin)
    w = tiling[1] * window_patches + (right_margin + left_margin)
    per_row = np.concatenate([np.full(((w + 1) // 2,), cfg.image_patch_token_id), [cfg.image_col_token_id]])
    crop_tokens = np.tile(per_row, [(h + 1) // 2])

    resized, global_mask = _resize_and_pad(image, (crop_size, crop_size), mean, std)
    patches = np.concatenate([_patchify(resized[None], patch), patches], 0)
    patch_ordering = np.where(patch_ordering >= 0, patch_ordering + tokens_per_image, -1)
    patch_ordering = np.concatenate([np.arange(0, tokens_per_image), patch_ordering], 0)
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
    if replicate_mask_quirk:
        masks = np.pad(masks, [[0, 1], [0, 0]], constant_values=-1)
    else:  # the "corrected" alignment: the global crop gets its own mask (tests/ablations only)
        global_patch_mask = _patchify(global_mask[None], patch).astype(np.float32).mean(axis=-1)
        masks = np.concatenate([global_patch_mask, masks], 0)
    return ImageCrops(
        crops=patches.astype(np.float32),
        tokens=tokens,
        patch_ordering=patch_ordering.astype(np.int64),
        masks=masks.astype(np.float32),
        tiling=tiling,
    )


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
    ) -> MolmoInputs:
        """Build the model inputs. ``image`` may be bytes, a PIL image, an RGB uint8 array or None."""
        cfg = self.config
        text_ids = np.asarray(self.prompt_ids(question), dtype=np.int64)
        bos = np.asarray([self.tokenizer.bos_id], dtype=np.int64)
        if image is None:
            return MolmoInputs(input_ids=torch.from_numpy(np.concatenate([bos, text_ids])))
        max_crops = int(max_crops if max_crops is not None else cfg.max_crops)
        rgb = image if _is_rgb_array(image) and self._within_limits(image) else self.load_image(image)
        crops = image_to_crops(rgb, cfg, max_crops, replicate_mask_quirk=replicate_mask_quirk)
        idx = build_image_input_idx(
            crops.tokens, crops.patch_ordering, cfg.image_patch_token_id, cfg.tokens_per_crop
        )
        # The image goes first; BOS is prepended, shifting every feature position by one.
        input_ids = np.concatenate([bos, crops.tokens, text_ids])
        idx = np.where(idx < 0, idx, idx + 1)
        layout = image_layout(rgb.shape[1], rgb.shape[0], cfg, max_crops)
        n_patch_tokens = int((crops.tokens == cfg.image_patch_token_id).sum())
        if (
            layout.tiling != crops.tiling
            or layout.num_crops != crops.crops.shape[0]
            or layout.num_image_tokens != crops.tokens.shape[0]
            or layout.num_patch_tokens != n_patch_tokens
        ):
            raise AssertionError(
                f"layout {layout} disagrees with the crops made ({crops.tiling}, {crops.crops.shape})"
            )
        return MolmoInputs(
            input_ids=torch.from_numpy(input_ids),
            images=torch.from_numpy(crops.crops),
            image_masks=torch.from_numpy(crops.masks),
            image_input_idx=torch.from_numpy(idx),
            num_crops=layout.num_crops,
            num_patch_tokens=layout.num_patch_tokens,
            num_image_tokens=layout.num_image_tokens,
            tiling=layout.tiling,
            image_size=(int(rgb.shape[1]), int(rgb.shape[0])),
            max_crops=max_crops,
        )

    def _within_limits(self, arr: np.ndarray) -> bool:
        h, w = arr.shape[:2]
        return bounded_size(w, h, self.limits) == (w, h)


def _is_rgb_array(x: Any) -> bool:
    return (
        isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 3 and x.shape[-1] == 3 and x.size > 0
    )
