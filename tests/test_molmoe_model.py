"""MolmoE model equivalence against the independent reference (tests/molmo_reference.py).

Tiny sizes, float32, CPU, fan-in scaled random weights (molmoe.md testing note). Our loader +
forward must match the reference's logits to 1e-4 (text only and with images of several tilings);
each planted mistake must move them by more than 1e-2; lowered top_k and skipped blocks must match
the reference run with the same settings; cached greedy decoding must match recomputation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
try:  # tests/ on sys.path (rootdir-style import, no tests/__init__.py)
    from molmo_reference import MolmoReference
except ImportError:  # tests imported as a package
    from tests.molmo_reference import MolmoReference
from transformers import DynamicCache

from rollout_workers.molmoe.config import MolmoeConfig
from rollout_workers.molmoe.loader import build_empty, load_checkpoint, load_molmoe, random_full_size
from rollout_workers.molmoe.make_tiny_checkpoint import make_tiny_checkpoint
from rollout_workers.molmoe.modeling import MolmoeModel
from rollout_workers.molmoe.skip import SkipAwareCache, top_k_override

EQUIV_TOL = 1e-4
MISTAKE_MIN = 1e-2


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_molmoe") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def ref(ckpt):
    return MolmoReference.from_folder(ckpt)


@pytest.fixture(scope="module")
def bundle(ckpt):
    return load_molmoe(ckpt)


def _image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    # smooth structure plus noise, so crops differ from each other
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 255 // max(1, width - 1)), (yy * 255 // max(1, height - 1)), (xx + yy) % 256], -1)
    return np.clip(base + rng.integers(-40, 40, size=base.shape), 0, 255).astype(np.uint8)


# (question, image size or None, max_crops, expected tiling)
CASES = [
    ("what color is the circle", None, None, None),
    ("how many squares", (200, 150), 1, (1, 1)),
    ("how many squares", (200, 150), 4, (2, 2)),
    ("how many squares", (200, 150), 12, (2, 3)),
    ("is there a star", (90, 300), 12, (5, 1)),
    ("which shape is left", (640, 480), 12, (3, 4)),
]
CASE_IDS = ["text-only", "4:3-1x1", "4:3-2x2", "4:3-2x3", "tall-5x1", "640x480-3x4"]


def _inputs(bundle, case, **kw):
    question, size, max_crops, _ = case
    image = None if size is None else _image(*size)
    return bundle.preprocessor.preprocess(question, image=image, max_crops=max_crops, **kw)


def _ours(model, inp, **kw):
    with torch.no_grad():
        return model(inp.input_ids, inp.images, inp.image_masks, inp.image_input_idx, **kw)[0]


def _ref(ref, inp, **kw):
    with torch.no_grad():
        return ref.forward(inp.input_ids, inp.images, inp.image_masks, inp.image_input_idx, **kw)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_logits_match_reference(bundle, ref, case):
    inp = _inputs(bundle, case)
    if case[3] is not None:
        assert inp.tiling == case[3]
    ours, want = _ours(bundle.model, inp), _ref(ref, inp)
    diff = float((ours - want).abs().max())
    print(
        f"[equiv] {case[1]} max_crops={case[2]} tiling={inp.tiling} T={inp.num_tokens}: "
        f"max|dlogit|={diff:.2e}"
    )
    assert ours.shape == want.shape == (inp.num_tokens, bundle.config.embedding_size)
    assert diff < EQUIV_TOL
    # the comparison has teeth: logits are O(1) and the image moves them
    assert float(want.abs().max()) > 1.0
    if inp.images is not None:
        assert (
            float((_ours(bundle.model, inp.__class__(input_ids=inp.input_ids)) - want).abs().max())
            > MISTAKE_MIN
        )


# ---------------------------------------------------------------------------------------------
# Planted mistakes: each is applied to OUR model, weights or preprocessing output only.
MISTAKE_CASE = ("how many squares", (200, 150), 4, (2, 2))


def _most_routed_expert(model, inp, block):
    seen = []
    handle = model.layers[block].mlp.gate.register_forward_hook(lambda m, a, out: seen.append(out[2]))
    try:
        _ours(model, inp)
    finally:
        handle.remove()
    return int(torch.bincount(seen[0].reshape(-1), minlength=model.config.num_experts).argmax())


def _plant(name, model, bundle, inp):
    """Return the (model, inputs) to run for the mistake ``name``."""
    cfg = model.config
    with torch.no_grad():
        if name == "image features dropped":
            return model, inp.__class__(input_ids=inp.input_ids)
        if name == "pad rows swapped":
            model.connector.pad_embed.copy_(model.connector.pad_embed.flip(0).clone())
        elif name == "mask quirk undone":
            return model, _inputs(bundle, MISTAKE_CASE, replicate_mask_quirk=False)
        elif name == "vit layer order swapped":
            model.config = cfg.replace(vit_layers=tuple(reversed(cfg.vit_layers)))
        elif name == "patch pixel order wrong":  # flattened as (c, dh, dw) instead of (dh, dw, c)
            n, npatch, _ = inp.images.shape
            p = cfg.patch_size_px
            bad = inp.images.view(n, npatch, p, p, 3).permute(0, 1, 4, 2, 3).reshape(n, npatch, -1)
            return model, inp.__class__(
                input_ids=inp.input_ids,
                images=bad.contiguous(),
                image_masks=inp.image_masks,
                image_input_idx=inp.image_input_idx,
            )
        elif name == "q/k norm swapped":
            for layer in model.layers:
                q, k = layer.self_attn.q_norm.weight, layer.self_attn.k_norm.weight
                qv = q.clone()
                q.copy_(k)
                k.copy_(qv)
        elif name == "expert gate/up swapped":
            e = _most_routed_expert(model, inp, 0)
            w = model.layers[0].mlp.experts.gate_up_proj
            half = w.shape[1] // 2
            w[e] = torch.cat([w[e, half:], w[e, :half]]).clone()
        elif name == "wrong rope theta":
            model.llm.config.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
            model.llm.model.rotary_emb = type(model.llm.model.rotary_emb)(config=model.llm.config)
        else:
            raise ValueError(name)
    return model, inp


MISTAKES = [
    "image features dropped",
    "pad rows swapped",
    "mask quirk undone",
    "vit layer order swapped",
    "patch pixel order wrong",
    "q/k norm swapped",
    "expert gate/up swapped",
    "wrong rope theta",
]


@pytest.mark.parametrize("mistake", MISTAKES)
def test_planted_mistake_is_caught(ckpt, bundle, ref, mistake):
    inp = _inputs(bundle, MISTAKE_CASE)
    want = _ref(ref, inp)
    model = load_checkpoint(ckpt)  # fresh copy: the mistake must not leak into other tests
    assert float((_ours(model, inp) - want).abs().max()) < EQUIV_TOL  # correct before planting
    model, bad_inp = _plant(mistake, model, bundle, inp)
    diff = float((_ours(model, bad_inp) - want).abs().max())
    print(f"[mistake] {mistake}: max|dlogit|={diff:.4f}")
    assert diff > MISTAKE_MIN


# ---------------------------------------------------------------------------------------------
# top_k and block skipping
KNOB_CASES = [
    ({0: 4, 1: 4, 2: 4, 3: 4}, None, "top_k 4 everywhere"),
    ({1: 1, 3: 8}, None, "top_k 1 and 8 on two blocks"),
    (None, [0, 2, 3], "skip block 1"),
    ({2: 1}, [0, 2], "skip 1 and 3, top_k 1 on block 2"),
    ({1: 3}, [1, 2, 3], "skip block 0"),
]


@pytest.mark.parametrize("top_k,block_ids,label", KNOB_CASES, ids=[c[2] for c in KNOB_CASES])
def test_top_k_and_skip_match_reference(bundle, ref, top_k, block_ids, label):
    inp = _inputs(bundle, ("how many squares", (200, 150), 4, None))
    skip = set() if block_ids is None else set(range(bundle.config.n_layers)) - set(block_ids)
    want = _ref(ref, inp, top_k=top_k, skip=skip)
    native = [layer.mlp.gate.top_k for layer in bundle.model.layers]
    ours = _ours(bundle.model, inp, top_k=top_k, block_ids=block_ids)
    diff = float((ours - want).abs().max())
    print(f"[knobs] {label}: max|dlogit|={diff:.2e}")
    assert diff < EQUIV_TOL
    # the setting matters (the reference at native settings is far away) ...
    assert float((ours - _ref(ref, inp)).abs().max()) > MISTAKE_MIN
    # ... and it did not stick
    assert [layer.mlp.gate.top_k for layer in bundle.model.layers] == native


def test_top_k_restored_after_error(bundle):
    layers = bundle.model.layers
    native = [layer.mlp.gate.top_k for layer in layers]
    with pytest.raises(RuntimeError):
        with top_k_override(layers, {0: 1, 2: 5}):
            assert layers[0].mlp.gate.top_k == 1
            raise RuntimeError("boom")
    assert [layer.mlp.gate.top_k for layer in layers] == native


def test_invalid_knobs_are_rejected(bundle):
    inp = _inputs(bundle, CASES[0])
    for bad in ([2, 1], [], [0, 4], [0, 0]):
        with pytest.raises(ValueError):
            _ours(bundle.model, inp, block_ids=bad)
    for bad in (0, 9, {1: 0}):
        with pytest.raises(ValueError):
            _ours(bundle.model, inp, top_k=bad)


@pytest.mark.parametrize(
    "block_ids,top_k", [(None, None), ([0, 2, 3], {2: 1}), ([1, 2, 3], 4)], ids=["all", "skip-1", "skip-0"]
)
def test_cached_greedy_decode_matches_recompute(bundle, ref, block_ids, top_k):
    inp = _inputs(bundle, ("how many squares", (200, 150), 4, None))
    skip = set() if block_ids is None else set(range(4)) - set(block_ids)
    ref_top_k = (
        None if top_k is None else (top_k if isinstance(top_k, dict) else {b: top_k for b in block_ids})
    )
    want = ref.greedy(
        inp.input_ids, inp.images, inp.image_masks, inp.image_input_idx, 5, top_k=ref_top_k, skip=skip
    )
    got = bundle.model.greedy_generate(
        inp.input_ids,
        inp.images,
        inp.image_masks,
        inp.image_input_idx,
        max_new_tokens=5,
        block_ids=block_ids,
        top_k=top_k,
        eos_token_id=-1,
    )
    assert got == want


def test_split_prefill_and_decode_step_match_reference(bundle, ref):
    """Prefill as prefix blocks then the rest (one cache), then one decode step."""
    model = bundle.model
    inp = _inputs(bundle, ("how many squares", (200, 150), 4, None))
    cache = model.new_cache([0, 1, 3])
    with torch.no_grad():
        x = model.embed(inp.input_ids, inp.images, inp.image_masks, inp.image_input_idx)
        h = model.run_blocks(x, [0], cache=cache)
        h = model.run_blocks(h, [1, 3], cache=cache, top_k={3: 3})
        logits = model.head(h)[0]
        nxt = int(logits[-1].argmax())
        h = model.run_blocks(model.embed_tokens(torch.tensor([nxt])), [0], cache=cache)
        h = model.run_blocks(h, [1, 3], cache=cache, top_k={3: 3})
        step = model.head(h)[0, -1]
    want = ref.forward(
        inp.input_ids, inp.images, inp.image_masks, inp.image_input_idx, top_k={3: 3}, skip={2}
    )
    assert float((logits - want).abs().max()) < EQUIV_TOL
    ids2 = torch.cat([inp.input_ids, torch.tensor([nxt])])
    want2 = ref.forward(ids2, inp.images, inp.image_masks, inp.image_input_idx, top_k={3: 3}, skip={2})[-1]
    assert float((step - want2).abs().max()) < EQUIV_TOL
    assert cache.get_seq_length() == inp.num_tokens + 1


def test_skip_aware_cache_reads_a_kept_block(bundle):
    """With block 0 skipped, a plain DynamicCache reports length 0 (HF would then place the next
    token at position 0); the SkipAwareCache reports the true length."""
    model = bundle.model
    ids = torch.tensor([0, 5, 6, 7, 8])
    plain = DynamicCache(config=model.llm.config)
    aware = SkipAwareCache(config=model.llm.config, ref_layer=1)
    with torch.no_grad():
        for cache in (plain, aware):
            model.run_blocks(model.embed_tokens(ids), [1, 2, 3], cache=cache)
    assert plain.get_seq_length() == 0
    assert aware.get_seq_length() == 5 and aware.get_seq_length(2) == 5
    assert aware.get_mask_sizes(1, 0) == aware.get_mask_sizes(1, 1)


def test_encode_images_and_embed_segments(bundle, ref):
    """The segments compose to the same logits as forward; features are scatter-ADDED."""
    model = bundle.model
    inp = _inputs(bundle, ("how many squares", (200, 150), 4, None))
    with torch.no_grad():
        feats = model.encode_images(inp.images, inp.image_masks)
        assert feats.shape == (inp.num_crops, model.config.tokens_per_crop, model.config.d_model)
        ref_feats = ref.image_features(inp.images, inp.image_masks)
        assert float((feats - ref_feats).abs().max()) < EQUIV_TOL
        words = model.embed_tokens(inp.input_ids)
        x = model.embed(inp.input_ids, image_features=feats, image_input_idx=inp.image_input_idx)
        patch_pos = inp.input_ids == model.config.image_patch_token_id
        assert torch.equal(x[0, ~patch_pos], words[0, ~patch_pos])  # only <im_patch> rows change
        idx = inp.image_input_idx.reshape(-1)
        flat = feats.reshape(-1, feats.shape[-1])
        j = int(torch.nonzero(idx >= 0)[0])
        assert torch.allclose(x[0, idx[j]], words[0, idx[j]] + flat[j], atol=1e-6)
        logits = model.head(model.run_blocks(x))
    assert torch.allclose(logits, model(inp.input_ids, inp.images, inp.image_masks, inp.image_input_idx))


def test_patch_embeddings_equal_clips_convolution(bundle):
    """One GEMM over the patch rows == transformers' stride-p convolution over the rebuilt crop (+ CLS and
    positions), so the model never rebuilds the pixel grid."""
    model, cfg = bundle.model, bundle.config
    side, p = cfg.crop_patches, cfg.patch_size_px
    patches = torch.randn(3, cfg.patches_per_crop, cfg.patch_dim, generator=torch.Generator().manual_seed(0))
    pixels = patches.view(3, side, side, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(3, 3, side * p, side * p)
    with torch.no_grad():
        want = model.vision.embeddings(pixels)
        got = model.patch_embeddings(patches)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_new_embedding_rows_are_used(bundle):
    model, cfg = bundle.model, bundle.config
    ids = torch.tensor(
        [cfg.eos_token_id, cfg.embedding_size, cfg.embedding_size + cfg.additional_vocab_size - 1]
    )
    with torch.no_grad():
        x = model.embed_tokens(ids)[0]
    assert torch.equal(x[1], model.new_embedding[0]) and torch.equal(x[2], model.new_embedding[-1])
    assert torch.equal(x[0], model.llm.model.embed_tokens.weight[cfg.eos_token_id])
    with pytest.raises(ValueError):
        model.embed_tokens(torch.tensor([cfg.total_vocab_size]))


def test_random_constructor_is_labelled_and_materialised():
    model = random_full_size("cpu", dtype=torch.float32, config=MolmoeConfig.tiny())
    assert "RANDOM" in model.weights_source
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert model.llm.model.rotary_emb.inv_freq.dtype == torch.float32
    with torch.no_grad():
        logits = model(torch.tensor([0, 10, 20]))
    assert torch.isfinite(logits).all()


def test_full_size_structure_on_meta():
    """The full-size model builds (on meta: no memory) with the documented parameter count."""
    model = build_empty(MolmoeConfig.full(), device="meta", dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    assert 7.1e9 < n_params < 7.35e9, n_params
    assert model.dtype == torch.bfloat16 and model.vision_dtype == torch.float32
    assert len(model.vision.encoder.layers) == 23 and model.config.vit_block_indices == (21, 14)
    assert model.llm.model.rotary_emb.inv_freq.dtype == torch.float32
    assert isinstance(model, MolmoeModel)
