"""The fast preprocessing (one torch path for CPU and device) against a frozen copy of the
numpy/torch implementation it replaced (commit 6267846): bit-identical on the CPU, within float
rounding on a device, identical masks/ids/positions; layout caching; tokenisation."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rollout_workers.molmoe import preprocessing
from rollout_workers.molmoe.config import MolmoeConfig
from rollout_workers.molmoe.preprocessing import (
    MolmoPreprocessor,
    aa_bilinear_taps,
    crop_masks,
    crop_plan,
    image_to_crops,
    resize_bilinear_aa,
    resize_bilinear_aa_taps,
    token_layout,
    unit_float_image,
)
from rollout_workers.molmoe.tokenizer import MolmoTokenizer
from rollout_workers.molmoe_backend import word_level_tokenizer

FULL = MolmoeConfig.full()
TINY = MolmoeConfig.tiny()


# ================================================================ frozen reference (do not edit)
# Verbatim copy of rollout_workers/molmoe/preprocessing.py at commit 6267846 (names prefixed with
# _frozen), plus the assembly MolmoPreprocessor.preprocess did around it.


def _frozen_select_tiling(height: float, width: float, window_px: int, max_crops: int) -> tuple[int, int]:
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


def _frozen_resize_and_pad(
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


def _frozen_patchify(arr: np.ndarray, patch: int) -> np.ndarray:
    """[n, H, W, (c)] -> [n, (H/p)*(W/p), p*p*(c)] in (h, w) patch order, (dh, dw, c) pixel order."""
    n, height, width = arr.shape[:3]
    extra = arr.shape[3:]
    x = arr.reshape(n, height // patch, patch, width // patch, patch, *extra)
    x = np.moveaxis(x, 2, 3)  # n, h, w, dh, dw, (c)
    return x.reshape(n, (height // patch) * (width // patch), -1)


@dataclass
class _FrozenImageCrops:
    crops: np.ndarray  # float32 [n_crops, n_patches, patch_dim]
    tokens: np.ndarray  # int64 [n_image_tokens]
    patch_ordering: np.ndarray  # int64 [n_crops * tokens_per_crop]
    masks: np.ndarray  # float32 [n_crops, n_patches]
    tiling: tuple[int, int]


def _frozen_image_to_crops(
    image: np.ndarray,
    config: MolmoeConfig,
    max_crops: int,
    replicate_mask_quirk: bool = True,
) -> _FrozenImageCrops:
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
    tiling = _frozen_select_tiling(height - total_margin_px, width - total_margin_px, window_px, max_crops)
    src, img_mask = _frozen_resize_and_pad(
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

    patches = _frozen_patchify(np.stack(patches_arr), patch)
    masks = _frozen_patchify(np.stack(mask_arr), patch).astype(np.float32).mean(axis=-1)
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

    resized, global_mask = _frozen_resize_and_pad(image, (crop_size, crop_size), mean, std)
    patches = np.concatenate([_frozen_patchify(resized[None], patch), patches], 0)
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
        global_patch_mask = _frozen_patchify(global_mask[None], patch).astype(np.float32).mean(axis=-1)
        masks = np.concatenate([global_patch_mask, masks], 0)
    return _FrozenImageCrops(
        crops=patches.astype(np.float32),
        tokens=tokens,
        patch_ordering=patch_ordering.astype(np.int64),
        masks=masks.astype(np.float32),
        tiling=tiling,
    )


def _frozen_build_image_input_idx(
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


def _frozen_preprocess(pre: MolmoPreprocessor, question: str, rgb: np.ndarray, max_crops: int, quirk=True):
    """What MolmoPreprocessor.preprocess returned at commit 6267846 for an RGB uint8 array:
    (input_ids, images, image_masks, image_input_idx) as numpy arrays."""
    cfg = pre.config
    text_ids = np.asarray(pre.prompt_ids(question), dtype=np.int64)
    bos = np.asarray([pre.tokenizer.bos_id], dtype=np.int64)
    crops = _frozen_image_to_crops(rgb, cfg, max_crops, replicate_mask_quirk=quirk)
    idx = _frozen_build_image_input_idx(
        crops.tokens, crops.patch_ordering, cfg.image_patch_token_id, cfg.tokens_per_crop
    )
    input_ids = np.concatenate([bos, crops.tokens, text_ids])
    idx = np.where(idx < 0, idx, idx + 1)
    return input_ids, crops.crops, crops.masks, idx


# ================================================================ helpers
QUESTION = "what is this"
TINY_VARIANTS = {
    "tiny": TINY,
    "tiny-crop84": MolmoeConfig.tiny(crop_size_px=84, overlap_margins=(2, 2)),  # odd pooled grid (3x3)
    "tiny-margins0": MolmoeConfig.tiny(overlap_margins=(0, 0)),
    "tiny-margins42": MolmoeConfig.tiny(overlap_margins=(4, 2)),
    "tiny-crop140": MolmoeConfig.tiny(crop_size_px=140, overlap_margins=(2, 4)),  # 5x5 pooled grid
}


def _rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _pre(config: MolmoeConfig) -> MolmoPreprocessor:
    if config.image_patch_token_id == FULL.image_patch_token_id:
        return MolmoPreprocessor(config, word_level_tokenizer(config, QUESTION.split()))
    return MolmoPreprocessor(config, MolmoTokenizer.tiny())


def _assert_same_as_frozen(pre, rgb, max_crops, quirk=True, got=None):
    want_ids, want_px, want_masks, want_idx = _frozen_preprocess(pre, QUESTION, rgb, max_crops, quirk)
    if got is None:
        got = pre.preprocess(QUESTION, rgb, max_crops=max_crops, replicate_mask_quirk=quirk)
    assert got.images.dtype == torch.float32 and got.image_masks.dtype == torch.float32
    assert got.input_ids.dtype == torch.int64 and got.image_input_idx.dtype == torch.int64
    np.testing.assert_array_equal(got.input_ids.numpy(), want_ids)
    np.testing.assert_array_equal(got.images.numpy(), want_px)  # bitwise: no tolerance
    np.testing.assert_array_equal(got.image_masks.numpy(), want_masks)
    np.testing.assert_array_equal(got.image_input_idx.numpy(), want_idx)
    assert got.num_crops == want_px.shape[0]
    assert got.image_size == (rgb.shape[1], rgb.shape[0]) and got.max_crops == max_crops
    return got


# ================================================================ host path == frozen, bit for bit
@pytest.mark.parametrize(
    "size,max_crops",
    [
        ((1024, 768), 3),
        ((1024, 768), 6),
        ((1024, 768), 12),
        ((768, 1024), 12),
        ((640, 480), 12),
        ((1280, 720), 6),
        ((336, 336), 3),
        ((1000, 120), 12),
        ((37, 500), 6),
    ],
)
def test_full_size_host_path_is_bit_identical(size, max_crops):
    _assert_same_as_frozen(_pre(FULL), _rgb(*size, seed=size[0] + max_crops), max_crops)


@pytest.mark.parametrize("name", list(TINY_VARIANTS))
@pytest.mark.parametrize("quirk", [True, False])
def test_tiny_configs_host_path_is_bit_identical(name, quirk):
    pre = _pre(TINY_VARIANTS[name])
    sizes = [
        (200, 150),
        (150, 200),
        (112, 112),
        (90, 300),
        (1000, 120),
        (1, 1),
        (3, 500),
        (500, 3),
        (7, 9),
        (113, 111),
        (640, 480),
    ]
    for i, size in enumerate(sizes):
        for max_crops in (1, 2, 4, 6, 12):
            _assert_same_as_frozen(pre, _rgb(*size, seed=i), max_crops, quirk)


def test_random_sizes_host_path_is_bit_identical():
    rng = np.random.default_rng(7)
    pre = _pre(TINY)
    for _ in range(40):
        w, h = (int(v) for v in rng.integers(1, 700, size=2))
        _assert_same_as_frozen(pre, _rgb(w, h, seed=w * h), int(rng.integers(1, 13)), bool(rng.integers(2)))


def test_image_to_crops_keeps_its_numpy_api():
    img = _rgb(200, 150, seed=1)
    for quirk in (True, False):
        got = image_to_crops(img, TINY, 6, replicate_mask_quirk=quirk)
        want = _frozen_image_to_crops(img, TINY, 6, replicate_mask_quirk=quirk)
        for field in ("crops", "tokens", "patch_ordering", "masks"):
            a, b = getattr(got, field), getattr(want, field)
            assert isinstance(a, np.ndarray) and a.dtype == b.dtype, field
            np.testing.assert_array_equal(a, b)
        assert got.tiling == want.tiling


def test_bytes_read_only_and_strided_inputs_are_bit_identical():
    pre = _pre(FULL)
    img = _rgb(1024, 768, seed=5)
    for fmt, kw in (("PNG", {}), ("JPEG", {"quality": 90})):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, fmt, **kw)
        data = buf.getvalue()
        got = pre.preprocess(QUESTION, data, max_crops=3)
        _assert_same_as_frozen(pre, pre.load_image(data), 3, got=got)
    read_only = np.asarray(Image.fromarray(img))
    assert not read_only.flags.writeable
    _assert_same_as_frozen(pre, read_only, 3)
    flipped = img[::-1, ::2]  # negative/step strides: not C-contiguous
    _assert_same_as_frozen(pre, flipped, 6)


def test_cached_layouts_are_not_aliased_by_outputs():
    """Token ids / positions come from a per-tiling cache; outputs must be fresh tensors."""
    pre = _pre(TINY)
    img = _rgb(200, 150)
    first = pre.preprocess(QUESTION, img, max_crops=4)
    first.input_ids.fill_(-7)
    first.image_input_idx.fill_(-7)
    first.image_masks.fill_(-7)
    _assert_same_as_frozen(pre, img, 4)
    plan = crop_plan(150, 200, TINY, 4)
    layout = token_layout(TINY, plan.tiling)
    assert not layout.tokens.flags.writeable and not layout.image_input_idx.flags.writeable
    assert token_layout(TINY, plan.tiling) is layout and crop_plan(150, 200, TINY, 4) is plan


def test_masks_from_geometry_match_patchified_pixel_masks():
    """crop_masks (computed from the resize/pad geometry) equals patchifying the padding mask."""
    for name, cfg in TINY_VARIANTS.items():
        for size in [(200, 150), (31, 400), (112, 112), (5, 5)]:
            for mc in (1, 3, 9):
                img = _rgb(*size)
                for quirk in (True, False):
                    want = _frozen_image_to_crops(img, cfg, mc, replicate_mask_quirk=quirk).masks
                    got = crop_masks(crop_plan(size[1], size[0], cfg, mc), quirk)
                    np.testing.assert_array_equal(got, want, err_msg=f"{name} {size} {mc} {quirk}")


# ================================================================ device path
def _assert_device_matches_host(pre, rgb, max_crops, device, atol=1e-5, quirk=True):
    host = pre.preprocess(QUESTION, rgb, max_crops=max_crops, replicate_mask_quirk=quirk)
    dev = pre.preprocess(QUESTION, rgb, max_crops=max_crops, replicate_mask_quirk=quirk, device=device)
    want = torch.device(device)
    for name in ("input_ids", "images", "image_masks", "image_input_idx"):
        t = getattr(dev, name)
        assert t.device.type == want.type, name
        assert t.dtype == getattr(host, name).dtype and t.shape == getattr(host, name).shape, name
    assert float((dev.images.cpu() - host.images).abs().max()) <= atol
    assert torch.equal(dev.image_masks.cpu(), host.image_masks)
    assert torch.equal(dev.image_input_idx.cpu(), host.image_input_idx)
    assert torch.equal(dev.input_ids.cpu(), host.input_ids)
    assert (dev.tiling, dev.num_crops, dev.num_patch_tokens, dev.num_image_tokens, dev.image_size) == (
        host.tiling,
        host.num_crops,
        host.num_patch_tokens,
        host.num_image_tokens,
        host.image_size,
    )
    return host, dev


def test_device_path_on_cpu_matches_host_path():
    """device="cpu" runs the device code (upload, explicit-tap resize, normalise, cut) on the CPU:
    pixels within 1e-5 of the host path, masks/ids/positions identical."""
    full = _pre(FULL)
    for size, mc in [
        ((1024, 768), 3),
        ((1024, 768), 6),
        ((1024, 768), 12),
        ((300, 900), 12),
        ((3000, 40), 12),
    ]:
        _assert_device_matches_host(full, _rgb(*size), mc, "cpu")
    for name, cfg in TINY_VARIANTS.items():
        for size in [(200, 150), (7, 9), (1, 1), (640, 480), (3, 700), (700, 3)]:
            for mc in (1, 4, 12):
                _assert_device_matches_host(_pre(cfg), _rgb(*size), mc, "cpu", quirk=name != "tiny")


def test_explicit_tap_resize_matches_torch_cpu_kernel():
    """resize_bilinear_aa_taps (the device path's resize) against F.interpolate on the CPU, for
    down/up-scaling, unchanged axes, 1-px sides and the kernel's 1-px-wide-output quirk."""
    rng = np.random.default_rng(3)
    for in_h, in_w in [(768, 1024), (150, 200), (1, 1), (9, 7), (500, 3), (3, 500), (2, 1), (4096, 300)]:
        img = torch.from_numpy(rng.integers(0, 256, (in_h, in_w, 3), dtype=np.uint8))
        image01 = unit_float_image(img)
        targets = [(756, 1008), (252, 336), (in_h, in_w), (in_h * 3, in_w * 2), (1, 1), (in_h, 5)]
        targets += [(max(1, in_h // 7), max(1, in_w // 5)), (71, 1), (in_h, 1), (1, in_w)]
        for out_hw in targets:
            want = resize_bilinear_aa(image01, out_hw)
            got = resize_bilinear_aa_taps(image01, out_hw)
            assert got.shape == want.shape == (3, *out_hw)
            err = float((got - want).abs().max())
            # summation order only: ~1e-7, ~1e-6 when thousands of taps are summed (4096 -> 1)
            assert err <= 2e-6, f"{(in_h, in_w)} -> {out_hw}: {err}"
    # taps: tap-major, weights normalised, indices inside the axis
    idx, weight = aa_bilinear_taps(1024, 336)
    assert idx.shape == weight.shape and idx.shape[1] == 336
    assert idx.min() >= 0 and idx.max() <= 1023
    np.testing.assert_allclose(weight.sum(0), 1.0, atol=1e-6)


def test_explicit_tap_resize_bounds_its_gather(monkeypatch):
    """A large downscale gathers its taps in chunks (bounded memory) with the same result."""
    img = torch.from_numpy(_rgb(900, 700, seed=2))
    image01 = unit_float_image(img)
    whole = resize_bilinear_aa_taps(image01, (50, 64))
    monkeypatch.setattr(preprocessing, "_GATHER_BUDGET_ELEMENTS", 1000)
    chunked = resize_bilinear_aa_taps(image01, (50, 64))
    assert float((whole - chunked).abs().max()) <= 1e-6
    assert float((chunked - resize_bilinear_aa(image01, (50, 64))).abs().max()) <= 1e-6


def test_device_path_places_every_tensor_on_the_device():
    """On the meta device no data moves: every tensor must have been made on (or sent to) it."""
    pre = _pre(TINY)
    out = pre.preprocess(QUESTION, _rgb(200, 150), max_crops=4, device="meta")
    for t in (out.input_ids, out.images, out.image_masks, out.image_input_idx):
        assert t.device.type == "meta"
    assert out.images.shape == (5, TINY.patches_per_crop, TINY.patch_dim)
    text = pre.preprocess(QUESTION, device="meta")
    assert text.input_ids.device.type == "meta" and text.images is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_path_matches_host_path_within_rounding():
    """The same device code on CUDA: pixels within 1e-5 of the host (CPU) path, masks/ids equal."""
    full = _pre(FULL)
    for size, mc in [
        ((1024, 768), 3),
        ((1024, 768), 6),
        ((1024, 768), 12),
        ((768, 1024), 12),
        ((640, 480), 12),
        ((4000, 300), 12),
        ((336, 336), 1),
    ]:
        _assert_device_matches_host(full, _rgb(*size), mc, "cuda")
    for name, cfg in TINY_VARIANTS.items():
        for size in [(200, 150), (7, 9), (1, 1), (640, 480)]:
            for mc in (1, 4, 9):
                _assert_device_matches_host(_pre(cfg), _rgb(*size), mc, "cuda", quirk=name != "tiny")


# ================================================================ prompt
def test_prompt_ids_are_not_cached_state():
    """Tokenisation is cheap (tens of microseconds) and left uncached: equal questions give equal,
    independent id lists."""
    pre = _pre(TINY)
    a = pre.prompt_ids("how many red circles")
    a.append(-1)
    assert pre.prompt_ids("how many red circles") == pre.tokenizer.encode(
        " User: how many red circles Assistant:"
    )
