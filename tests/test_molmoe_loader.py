"""Loading MolmoE checkpoint folders (hub layout): round trip, strictness, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
try:  # tests/ on sys.path (rootdir-style import, no tests/__init__.py)
    from molmo_reference import read_official_folder
except ImportError:  # tests imported as a package
    from tests.molmo_reference import read_official_folder
from safetensors.torch import load_file, save_file

from rollout_workers.molmoe.config import MolmoeConfig
from rollout_workers.molmoe.loader import (
    INDEX_FILE,
    CheckpointError,
    load_checkpoint,
    load_molmoe,
    official_param_shapes,
    save_checkpoint,
)
from rollout_workers.molmoe.make_tiny_checkpoint import main as make_tiny_main
from rollout_workers.molmoe.make_tiny_checkpoint import make_tiny_checkpoint
from rollout_workers.molmoe.tokenizer import MolmoTokenizer


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("pristine") / "ckpt", seed=1)


@pytest.fixture
def ckpt(pristine, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(pristine, dst)
    return dst


def _shard_of(folder: Path, key: str) -> Path:
    return folder / json.loads((folder / INDEX_FILE).read_text())["weight_map"][key]


def _edit(folder: Path, key: str, fn) -> None:
    """Apply fn(dict of the shard holding key) and rewrite that shard and the index."""
    shard = _shard_of(folder, key)
    tensors = load_file(str(shard))
    fn(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = json.loads((folder / INDEX_FILE).read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
    index["weight_map"].update({k: shard.name for k in tensors})
    (folder / INDEX_FILE).write_text(json.dumps(index))


KEY = "model.transformer.blocks.2.mlp.experts.5.up_proj.weight"


def test_tiny_checkpoint_layout_and_size(pristine):
    files = {p.name for p in pristine.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        INDEX_FILE,
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
    } <= files
    assert len([f for f in files if f.endswith(".safetensors")]) >= 2  # sharded
    assert sum(p.stat().st_size for p in pristine.iterdir()) < 2_000_000
    cfg, sd = read_official_folder(pristine)
    assert cfg["model_type"] == "molmo" and cfg["block_type"] == "moe"
    assert {k: tuple(v.shape) for k, v in sd.items()} == official_param_shapes(MolmoeConfig.tiny())


def test_cli_writes_a_loadable_folder(tmp_path, capsys):
    assert make_tiny_main([str(tmp_path / "cli")]) == 0
    assert "MB" in capsys.readouterr().out
    bundle = load_molmoe(tmp_path / "cli")
    assert bundle.config == MolmoeConfig.tiny()
    assert "checkpoint" in bundle.model.weights_source


def test_round_trip_save_reproduces_the_official_tensors(pristine, tmp_path):
    model = load_checkpoint(pristine)
    save_checkpoint(model, tmp_path / "saved", MolmoTokenizer.from_folder(pristine), max_shard_bytes=400_000)
    _, original = read_official_folder(pristine)
    _, saved = read_official_folder(tmp_path / "saved")
    assert original.keys() == saved.keys()
    assert all(torch.equal(original[k], saved[k]) for k in original)
    again = load_checkpoint(tmp_path / "saved")
    ids = torch.tensor([0, 17, 42, 99, 200])
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))


def test_single_file_checkpoint_loads(pristine, tmp_path):
    folder = tmp_path / "single"
    shutil.copytree(pristine, folder)
    _, sd = read_official_folder(folder)
    for p in folder.glob("model-*.safetensors"):
        p.unlink()
    (folder / INDEX_FILE).unlink()
    save_file(sd, str(folder / "model.safetensors"))
    load_checkpoint(folder)


def test_bfloat16_llm_with_float32_vision(pristine):
    model = load_checkpoint(pristine, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.vision_dtype == torch.float32
    assert model.llm.model.rotary_emb.inv_freq.dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([0, 5, 9])).float()).all()


# ---------------------------------------------------------------------------------- errors
def _raises(folder, *needles):
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    msg = str(err.value)
    for needle in needles:
        assert needle in msg, msg
    assert isinstance(err.value, ValueError)
    return msg


def test_missing_tensor(ckpt):
    _edit(ckpt, KEY, lambda t: t.pop(KEY))
    _raises(ckpt, "1 missing", KEY)


def test_wrong_shape(ckpt):
    def shrink(t):
        t[KEY] = t[KEY][:, :-1].contiguous()

    _edit(ckpt, KEY, shrink)
    msg = _raises(ckpt, "wrong shape", KEY)
    assert "[32, 63]" in msg and "[32, 64]" in msg


def test_unexpected_tensor(ckpt):
    extra = "model.transformer.blocks.0.mlp.shared_expert.weight"
    _edit(ckpt, KEY, lambda t: t.__setitem__(extra, torch.zeros(3)))
    _raises(ckpt, "1 unexpected", extra)


def test_all_problems_listed_together(ckpt):
    def mangle(t):
        t.pop(KEY)
        t["stray.weight"] = torch.zeros(1)

    _edit(ckpt, KEY, mangle)
    _edit(ckpt, "lm_head.weight", lambda t: t.__setitem__("lm_head.weight", torch.zeros(7, 64)))
    _raises(ckpt, "missing", "unexpected", "wrong shape", KEY, "stray.weight", "lm_head.weight")


def test_megablocks_layout_is_recognised(ckpt):
    for p in ckpt.glob("model-*.safetensors"):
        p.unlink()
    (ckpt / INDEX_FILE).unlink()
    save_file(
        {
            "transformer.blocks.0.att_proj.weight": torch.zeros(192, 64),
            "transformer.blocks.0.ffn.router.layer.weight": torch.zeros(8, 64),
            "transformer.blocks.0.ffn.experts.mlp.w1": torch.zeros(8 * 32, 64),
            "transformer.blocks.0.ffn.experts.mlp.v1": torch.zeros(8 * 32, 64),
            "transformer.blocks.0.ffn.experts.mlp.w2": torch.zeros(8 * 32, 64),
        },
        str(ckpt / "model.safetensors"),
    )
    _raises(ckpt, "megablocks")


def test_pickled_bin_checkpoint_is_refused(ckpt):
    for p in ckpt.glob("model-*.safetensors"):
        p.unlink()
    (ckpt / INDEX_FILE).unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded")
    _raises(ckpt, "pytorch_model.bin", "megablocks")


def test_llama_config_is_the_wrong_model(ckpt):
    (ckpt / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64})
    )
    _raises(ckpt, "llama", "not a Molmo model")


def test_dense_molmo_is_the_wrong_architecture(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(block_type="sequential", image_pooling_2d="attention")
    (ckpt / "config.json").write_text(json.dumps(cfg))
    _raises(ckpt, "block_type='sequential'", "image_pooling_2d='attention'")


def test_missing_files(ckpt, tmp_path):
    _raises(tmp_path / "nowhere", "does not exist")
    shard = next(ckpt.glob("model-*.safetensors"))
    shard.unlink()
    _raises(ckpt, "do not exist", shard.name)
    (ckpt / "config.json").unlink()
    _raises(ckpt, "no config.json")


def test_missing_tokenizer(ckpt):
    (ckpt / "tokenizer.json").unlink()
    _raises(ckpt, "tokenizer.json")


def test_index_lists_a_tensor_its_shard_lacks(ckpt):
    index = json.loads((ckpt / INDEX_FILE).read_text())
    index["weight_map"]["model.transformer.blocks.0.attn.phantom"] = next(iter(index["weight_map"].values()))
    (ckpt / INDEX_FILE).write_text(json.dumps(index))
    _raises(ckpt, "not in their shard", "phantom")


def test_inconsistent_metadata(ckpt):
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": 3}))
    _raises(ckpt, "eos_token_id")


def test_inconsistent_preprocessor_config(ckpt):
    pre = json.loads((ckpt / "preprocessor_config.json").read_text())
    pre["base_image_input_size"] = [336, 336]
    (ckpt / "preprocessor_config.json").write_text(json.dumps(pre))
    _raises(ckpt, "base_image_input_size")
