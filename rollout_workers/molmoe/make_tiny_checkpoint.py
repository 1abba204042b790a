"""Write a tiny MolmoE checkpoint folder in the hub's layout (for tests and the embedded default).

    python -m rollout_workers.molmoe.make_tiny_checkpoint OUT_DIR [--seed 0] [--shards 2]

The weights are random with the fan-in scaled init (see :func:`loader.fan_in_init_official`),
written under the official tensor names in sharded safetensors with an index, next to config.json,
generation_config.json, preprocessor_config.json and the shipped tiny tokenizer. About 1.6 MB.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

from .config import MolmoeConfig
from .loader import fan_in_init_official, write_folder_metadata, write_official_shards
from .tokenizer import MolmoTokenizer


def make_tiny_checkpoint(
    out_dir: str | os.PathLike, seed: int = 0, num_shards: int = 2, config: MolmoeConfig | None = None
) -> Path:
    """Create ``out_dir`` holding a random tiny checkpoint; returns its path."""
    cfg = config or MolmoeConfig.tiny()
    tensors = fan_in_init_official(cfg, seed=seed)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    shard_bytes = max(1, -(-total // max(1, num_shards)))
    out = Path(out_dir)
    write_official_shards(tensors.items(), out, max_shard_bytes=shard_bytes)
    write_folder_metadata(cfg, MolmoTokenizer.tiny(), out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=2)
    args = parser.parse_args(argv)
    out = make_tiny_checkpoint(args.out_dir, seed=args.seed, num_shards=args.shards)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote tiny MolmoE checkpoint to {out} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
