"""Molmo preprocessing: tier counts (molmoe.md section 4), token layout, mask quirk, pixel layout,
image decoding (modes, corrupt data, memory bounds) and the tiny tokenizer."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rollout_workers.molmoe.config import ConfigError, MolmoeConfig
from rollout_workers.molmoe.preprocessing import (
    DecodeLimits,
    ImageDecodeError,
    ImageTooLargeError,
    MolmoPreprocessor,
    decode_image,
    image_layout,
    probe_image_size,
    tier_token_counts,
)
from rollout_workers.molmoe.tokenizer import TINY_TOKENIZER_PATH, MolmoTokenizer, build_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
FULL = MolmoeConfig.full()
TINY = MolmoeConfig.tiny()


def _full_size_tokenizer() -> MolmoTokenizer:
    """A word-level stand-in with the hub tokenizer's special ids (EOS 50279, image tokens
    50280..50284), so the full-size layout can be checked without the real tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<|endoftext|>", "<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>"]
    words = ["<unk>", "<|padding|>", "User:", "Assistant:", "How", "many", "dogs?", "what", "is", "this"]
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({f"<w{i}>": i for i in range(len(words), 50279)})
    vocab.update({t: 50279 + i for i, t in enumerate(specials)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    return MolmoTokenizer(tok)


@pytest.fixture(scope="module")
def tiny_pre():
    return MolmoPreprocessor(TINY, MolmoTokenizer.tiny())


def _rgb(width, height, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# ================================================================ tier counts (molmoe.md section 4)
# (width, height) -> {max_crops: (tiling, vit_crops, patch_tokens, all_image_tokens)}
TIER_TABLE = {
    (1024, 768): {
        1: ((1, 1), 2, 288, 316),
        3: ((1, 2), 3, 384, 412),
        6: ((2, 3), 7, 704, 740),
        12: ((3, 4), 13, 1152, 1196),
    },
    (1280, 720): {
        1: ((1, 1), 2, 288, 316),
        3: ((1, 2), 3, 384, 412),
        6: ((2, 3), 7, 704, 740),
        12: ((3, 4), 13, 1152, 1196),
    },
    (1920, 1080): {
        1: ((1, 1), 2, 288, 316),
        3: ((1, 2), 3, 384, 412),
        6: ((2, 3), 7, 704, 740),
        12: ((3, 4), 13, 1152, 1196),
    },
    (640, 480): {
        1: ((1, 1), 2, 288, 316),
        3: ((1, 2), 3, 384, 412),
        6: ((2, 3), 7, 704, 740),
        12: ((2, 3), 7, 704, 740),
    },
    (1024, 1024): {
        4: ((2, 2), 5, 544, 580),
        5: ((2, 2), 5, 544, 580),
        6: ((2, 2), 5, 544, 580),
        9: ((3, 3), 10, 928, 972),
        12: ((3, 3), 10, 928, 972),
    },
    (336, 336): {
        1: ((1, 1), 2, 288, 316),
        3: ((1, 1), 2, 288, 316),
        6: ((1, 1), 2, 288, 316),
        12: ((1, 1), 2, 288, 316),
    },
}


@pytest.mark.parametrize("size", list(TIER_TABLE), ids=[f"{w}x{h}" for w, h in TIER_TABLE])
def test_tier_counts_match_table(size):
    table = TIER_TABLE[size]
    counts = tier_token_counts(size[0], size[1], list(table))
    for (mc, (tiling, crops, patches, tokens)), got in zip(table.items(), counts, strict=True):
        lay = image_layout(size[0], size[1], FULL, mc)
        assert (lay.tiling, lay.num_crops, lay.num_patch_tokens, lay.num_image_tokens) == (
            tiling,
            crops,
            patches,
            tokens,
        )
        assert got == (crops, tokens)
        r, c = tiling
        assert patches == 144 + (8 * r + 4) * (8 * c + 4) and tokens == 160 + (8 * r + 4) * (8 * c + 5)


@pytest.fixture(scope="module")
def full_pre():
    return MolmoPreprocessor(FULL, _full_size_tokenizer())


@pytest.mark.parametrize(
    "size,max_crops",
    [
        ((1024, 768), 12),
        ((1280, 720), 6),
        ((640, 480), 12),
        ((1024, 1024), 9),
        ((336, 336), 12),
        ((640, 480), 1),
    ],
)
def test_full_size_preprocessing_gives_the_tabled_counts(full_pre, size, max_crops):
    inp = full_pre.preprocess("what is this", image=_rgb(*size), max_crops=max_crops)
    tiling, crops, patches, tokens = TIER_TABLE[size][max_crops]
    assert inp.tiling == tiling and inp.num_crops == crops == inp.images.shape[0]
    assert inp.images.shape[1:] == (576, 588) and inp.image_masks.shape == (crops, 576)
    assert inp.image_input_idx.shape == (crops, 144)
    ids = inp.input_ids
    assert int((ids == FULL.image_patch_token_id).sum()) == patches == inp.num_patch_tokens
    n_image = int(
        torch.isin(
            ids,
            torch.tensor(
                [
                    FULL.image_start_token_id,
                    FULL.image_end_token_id,
                    FULL.image_patch_token_id,
                    FULL.image_col_token_id,
                ]
            ),
        ).sum()
    )
    assert n_image == tokens == inp.num_image_tokens
    assert full_pre.tier_token_counts(*size, [max_crops]) == [(crops, tokens)]


@pytest.mark.parametrize(
    "size", [(200, 150), (90, 300), (640, 480), (1000, 120), (30, 20), (112, 112), (4000, 3000)]
)
def test_tier_counts_agree_with_preprocessing_tiny(tiny_pre, size):
    counts = tiny_pre.tier_token_counts(size[0], size[1], [1, 2, 4, 6, 12])
    for mc, (crops, tokens) in zip([1, 2, 4, 6, 12], counts, strict=True):
        inp = tiny_pre.preprocess("q", image=_rgb(*size, seed=mc), max_crops=mc)
        assert (inp.num_crops, inp.num_image_tokens) == (crops, tokens)
        assert inp.images.shape[0] == crops and inp.input_ids.shape[0] == 1 + tokens + len(
            tiny_pre.prompt_ids("q")
        )


# ================================================================ layout, prompt, mask quirk
def test_token_layout_and_prompt(full_pre):
    inp = full_pre.preprocess("How many dogs?", image=_rgb(640, 480), max_crops=12)
    cfg, ids = FULL, inp.input_ids.tolist()
    P, C, S, E = (
        cfg.image_patch_token_id,
        cfg.image_col_token_id,
        cfg.image_start_token_id,
        cfg.image_end_token_id,
    )
    prompt = full_pre.tokenizer.encode(" User: How many dogs? Assistant:")
    expected = [full_pre.tokenizer.bos_id, S] + ([P] * 12 + [C]) * 12 + [E]
    expected += [S] + ([P] * 28 + [C]) * 20 + [E] + prompt  # 2x3 tiling: (8r+4) rows of (8c+4) patches
    assert ids == expected
    assert full_pre.tokenizer.bos_id == full_pre.tokenizer.eos_id == 50279
    idx = inp.image_input_idx.reshape(-1)
    valid = idx[idx >= 0]
    patch_positions = torch.nonzero(inp.input_ids == P).reshape(-1)
    assert sorted(valid.tolist()) == patch_positions.tolist()  # every <im_patch> gets exactly one feature
    assert int((idx == -100).sum()) == 7 * 144 - 704
    assert inp.image_input_idx[0].tolist() == patch_positions[:144].tolist()  # global crop, row-major


def test_text_only_prompt(tiny_pre):
    inp = tiny_pre.preprocess("what color is it")
    assert inp.images is None and inp.num_crops == 0 and inp.num_image_tokens == 0
    assert inp.input_ids.tolist() == [tiny_pre.tokenizer.bos_id] + tiny_pre.tokenizer.encode(
        " User: what color is it Assistant:"
    )


def test_mask_quirk_is_replicated(tiny_pre):
    img = _rgb(200, 150)
    quirk = tiny_pre.preprocess("q", image=img, max_crops=4)
    fixed = tiny_pre.preprocess("q", image=img, max_crops=4, replicate_mask_quirk=False)
    assert torch.equal(quirk.images, fixed.images)
    assert torch.all(quirk.image_masks[-1] == -1)
    assert torch.equal(quirk.image_masks[:-1], fixed.image_masks[1:])  # each row one crop off
    # the image does not fill the padded tiling, so some patches are padding or partial
    assert bool((fixed.image_masks < 1).any()) and bool((fixed.image_masks == 1).any())


def test_pixels_are_normalised_and_patches_in_dh_dw_c_order(tiny_pre):
    """A 112x112 image needs no resize and no padding at max_crops 1 in the tiny config: both the
    global crop and the single crop are the image itself, patchified in (dh, dw, c) order."""
    img = _rgb(112, 112, seed=3)
    inp = tiny_pre.preprocess("q", image=img, max_crops=1)
    assert inp.tiling == (1, 1) and inp.num_crops == 2
    mean, std = np.array(TINY.image_mean, np.float32), np.array(TINY.image_std, np.float32)
    want = (img.astype(np.float32) / 255.0 - mean) / std
    p, side = TINY.patch_size_px, TINY.crop_patches
    for crop in (0, 1):
        patches = inp.images[crop].numpy().reshape(side, side, p, p, 3)  # (h, w, dh, dw, c)
        rebuilt = patches.transpose(0, 2, 1, 3, 4).reshape(side * p, side * p, 3)
        np.testing.assert_allclose(rebuilt, want, atol=1e-5)
    assert torch.all(inp.image_masks[:-1] == 1)


def test_small_and_extreme_images(tiny_pre):
    for size in [(1, 1), (3, 500), (500, 3), (7, 9)]:
        inp = tiny_pre.preprocess("q", image=_rgb(*size), max_crops=6)
        assert torch.isfinite(inp.images).all()
        assert inp.num_crops == inp.images.shape[0]


def test_config_rejects_layouts_the_official_code_cannot_build():
    with pytest.raises(ConfigError):
        MolmoeConfig.tiny(crop_size_px=70, overlap_margins=(2, 0))
    with pytest.raises(ConfigError):
        MolmoeConfig.tiny(overlap_margins=(1, 1))
    MolmoeConfig.tiny(crop_size_px=84, overlap_margins=(2, 2))  # 6 patches, window 2: fine


# ================================================================ decoding
def test_decode_modes():
    rgb = _rgb(40, 30)
    assert np.array_equal(decode_image(_encode(Image.fromarray(rgb), "PNG")), rgb)
    gray = decode_image(_encode(Image.fromarray(rgb[..., 0]), "PNG"))
    assert gray.shape == (30, 40, 3) and np.array_equal(gray[..., 1], rgb[..., 0])
    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[:, :20] = [10, 20, 30, 255]  # opaque left half, fully transparent (black) right half
    out = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert (out[:, :20] == [10, 20, 30]).all() and (out[:, 20:] == 255).all()
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    assert decode_image(_encode(pal, "PNG")).shape == (30, 40, 3)
    pal.info["transparency"] = 0
    assert decode_image(_encode(pal, "PNG", transparency=0)).shape == (30, 40, 3)
    cmyk = decode_image(_encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG", quality=95))
    assert cmyk.shape == (30, 40, 3) and cmyk[..., 0].mean() > 200 and cmyk[..., 1].mean() < 60  # red
    deep = np.full((30, 40), 128 * 257, dtype=np.uint16)
    deep[:, :10] = 65535
    out16 = decode_image(_encode(Image.fromarray(deep), "PNG"))
    assert out16.shape == (30, 40, 3) and out16[0, 0, 0] == 255 and out16[0, 20, 0] == 128
    flt = Image.fromarray(np.full((30, 40), 0.5, np.float32), "F")
    assert decode_image(_encode(flt, "TIFF"))[0, 0, 0] == 128
    assert decode_image(_encode(Image.fromarray(rgb), "GIF")).shape == (30, 40, 3)
    assert decode_image(_encode(Image.fromarray(rgb), "WEBP", lossless=True)).shape == (30, 40, 3)


def test_exif_orientation_is_applied():
    img = Image.fromarray(_rgb(40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    data = _encode(img, "JPEG", exif=exif.tobytes())
    assert decode_image(data).shape == (40, 20, 3)
    assert probe_image_size(data) == (20, 40)
    assert decode_image(data, apply_exif_orientation=False).shape == (20, 40, 3)


def _png_with_size(width: int, height: int) -> bytes:
    data = bytearray(_encode(Image.new("RGB", (1, 1)), "PNG"))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


@pytest.mark.parametrize(
    "data,what",
    [
        (b"", "empty"),
        (b"this is not an image at all" * 10, "recognised"),
        (_encode(Image.fromarray(_rgb(64, 64)), "JPEG")[:300], "truncated"),
        (_encode(Image.fromarray(_rgb(64, 64)), "PNG")[:200], "truncated"),
        (_png_with_size(0, 10), "zero"),
    ],
    ids=["empty", "garbage", "truncated-jpeg", "truncated-png", "zero-width"],
)
def test_bad_images_raise_value_errors(data, what):
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data)
    assert isinstance(err.value, ValueError)
    assert what in str(err.value) or "corrupt" in str(err.value)


def test_zero_size_array_and_wrong_types(tiny_pre):
    with pytest.raises(ImageDecodeError):
        tiny_pre.preprocess("q", image=np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(TypeError):
        tiny_pre.preprocess("q", image=12345)


def test_huge_png_is_refused_before_decoding():
    data = _png_with_size(20000, 20000)  # a 1x1 payload claiming 400 Mpx: decoding would need 1.2 GB
    with pytest.raises(ImageTooLargeError):
        decode_image(data)
    assert probe_image_size(data) == (4096, 4096)
    with pytest.raises(ImageTooLargeError):
        decode_image(_png_with_size(100000, 100000))


def test_huge_jpeg_is_decoded_downscaled_with_bounded_memory(tmp_path):
    """A 20000x20000 JPEG is decoded at 1/4 scale and downscaled to 4096 px; measured in a fresh
    process, decoding raises peak memory by far less than the 1.2 GB a full RGB decode needs."""
    path = tmp_path / "huge.jpg"
    big = Image.new("L", (20000, 20000), 90)
    big.save(path, "JPEG", quality=30)
    del big
    code = (
        "import resource, sys; from pathlib import Path\n"
        "from rollout_workers.molmoe.preprocessing import decode_image, tier_token_counts\n"
        "data = Path(sys.argv[1]).read_bytes()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "img = decode_image(data)\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(img.shape[0], img.shape[1], int(img.mean()), (after - before) // 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr
    h, w, mean, grown_mb = map(int, out.stdout.split())
    assert (h, w) == (4096, 4096) and abs(mean - 90) <= 2
    assert grown_mb < 300, f"decoding grew peak RSS by {grown_mb} MB"
    assert tier_token_counts(20000, 20000, [12]) == tier_token_counts(4096, 4096, [12])


def test_decode_limits_are_configurable():
    data = _encode(Image.fromarray(_rgb(300, 200)), "PNG")
    small = decode_image(data, DecodeLimits(max_side_px=150))
    assert small.shape == (100, 150, 3)
    with pytest.raises(ImageTooLargeError):
        decode_image(data, DecodeLimits(max_side_px=150, max_decode_pixels=1000))
    jpeg = _encode(Image.fromarray(_rgb(300, 200)), "JPEG")
    assert decode_image(jpeg, DecodeLimits(max_side_px=150, max_decode_pixels=1000)).shape == (100, 150, 3)


# ================================================================ tokenizer
def test_shipped_tiny_tokenizer():
    assert TINY_TOKENIZER_PATH.stat().st_size < 200_000
    tok = MolmoTokenizer.tiny()
    tok.check_matches(TINY)
    rebuilt = MolmoTokenizer(build_tiny_tokenizer())
    for text in [" User: How many red circles? Assistant:", "héllo wörld 123 ÷ ✓", " the blue square"]:
        ids = tok.encode(text)
        assert ids == rebuilt.encode(text)
        assert tok.decode(ids) == text
    assert tok.token_ids() == rebuilt.token_ids()
    assert tok.decode([tok.bos_id, tok.image_patch_id] + tok.encode(" yes") + [tok.eos_id]) == " yes"
