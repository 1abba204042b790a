"""MolmoE-1B (allenai/MolmoE-1B-0924) from transformers parts, its hub-layout checkpoint loader and
the Molmo preprocessing. See docs/MODEL.md.

    from rollout_workers.molmoe import load_molmoe
    m = load_molmoe("path/to/checkpoint", device="cuda", dtype=torch.bfloat16)
    inputs = m.preprocessor.preprocess("What is shown?", image=image_bytes, max_crops=6).to("cuda")
    answer = m.model.greedy_generate(inputs.input_ids, inputs.images, inputs.image_masks,
                                     inputs.image_input_idx, max_new_tokens=32)
    print(m.tokenizer.decode(answer))
"""

from .config import ConfigError, MolmoeConfig
from .connector import MolmoConnector
from .loader import (
    CheckpointError,
    Molmoe,
    build_empty,
    load_checkpoint,
    load_molmoe,
    random_full_size,
    read_config,
    save_checkpoint,
)
from .make_tiny_checkpoint import make_tiny_checkpoint
from .modeling import MolmoeModel
from .preprocessing import (
    DecodeLimits,
    ImageDecodeError,
    ImageLayout,
    ImageTooLargeError,
    MolmoInputs,
    MolmoPreprocessor,
    decode_image,
    image_layout,
    probe_image_size,
    tier_token_counts,
)
from .skip import SkipAwareCache, top_k_override
from .tokenizer import MolmoTokenizer

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DecodeLimits",
    "ImageDecodeError",
    "ImageLayout",
    "ImageTooLargeError",
    "Molmoe",
    "MolmoConnector",
    "MolmoInputs",
    "MolmoPreprocessor",
    "MolmoTokenizer",
    "MolmoeConfig",
    "MolmoeModel",
    "SkipAwareCache",
    "build_empty",
    "decode_image",
    "image_layout",
    "load_checkpoint",
    "load_molmoe",
    "make_tiny_checkpoint",
    "probe_image_size",
    "random_full_size",
    "read_config",
    "save_checkpoint",
    "tier_token_counts",
    "top_k_override",
]
