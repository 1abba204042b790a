"""Tokenizer for MolmoE: a thin wrapper over a ``tokenizers.Tokenizer`` (tokenizer.json).

The full model reads ``tokenizer.json`` from its checkpoint folder (nothing is downloaded). Tiny
configurations use a small byte-level BPE that this module builds (:func:`build_tiny_tokenizer`) and
that the project ships as ``assets/tiny_tokenizer.json``. Both carry the Molmo special tokens
``<im_start> <im_end> <im_patch> <im_col> <|image|>`` and ``<|endoftext|>``, which Molmo uses as BOS
and EOS (the OLMo tokenizer has no BOS token).

Regenerate the shipped file with ``python -m rollout_workers.molmoe.tokenizer``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from .config import EOS_TOKEN, IMAGE_SPECIAL_TOKENS, PAD_TOKEN, MolmoeConfig

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TINY_TOKENIZER_PATH = ASSETS_DIR / "tiny_tokenizer.json"

# BPE merges are learned on these words (the vocabulary of simple visual questions and answers).
_TINY_WORDS = """
the a an is are was were be what which who whom whose where when why how many much of in on at to from
with without by for and or not no yes there here this that these those it its they them their
color colour colours colors shape shapes number numbers count counts image picture photo scene
left right top bottom middle center centre corner edge above below under over behind front next near
small smaller smallest large larger largest big bigger biggest tiny huge little long short wide tall
red green blue yellow orange purple violet black white gray grey brown pink cyan magenta gold silver
circle circles square squares triangle triangles rectangle rectangles star stars dot dots line lines
cross crosses diamond diamonds ellipse hexagon object objects thing things item items text letter
letters digit digits word words one two three four five six seven eight nine ten eleven twelve zero
none some all any each every both either first second third last same different more less most least
than as do does did can could should would will has have had see seen show shows shown visible
user assistant answer question describe name tell give list find say write read
""".split()


def _tiny_corpus() -> list[str]:
    words = _TINY_WORDS
    caps = [w.capitalize() for w in words[:40]]
    lines = [" ".join(words)] * 4 + [" ".join(caps)] * 2
    lines += [f" User: {w} Assistant: {w}" for w in words]
    lines += [f" User: How many {w}? Assistant: {n}" for w, n in zip(words, "0123456789" * 40, strict=False)]
    lines += [" ".join(str(i) for i in range(100))]
    return lines


def build_tiny_tokenizer(vocab_size: int = 448) -> Tokenizer:
    """Train the tiny byte-level BPE (deterministic for a given ``vocab_size``).

    Ids: 0 ``<|endoftext|>`` (EOS, also used as BOS), 1 ``<|padding|>``, then 256 byte tokens and the
    learned merges up to ``vocab_size``; the five image tokens follow at ``vocab_size .. +4``.
    """
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        min_frequency=1,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tiny tokenizer trained to {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    tok.add_special_tokens(list(IMAGE_SPECIAL_TOKENS))
    return tok


class MolmoTokenizer:
    """Text <-> ids, plus the ids of Molmo's special tokens.

    ``encode`` never adds special tokens (the preprocessor lays out BOS and image tokens itself).
    """

    def __init__(self, tokenizer: Tokenizer, eos_token: str = EOS_TOKEN, pad_token: str = PAD_TOKEN):
        self._tok = tokenizer
        missing = [t for t in (*IMAGE_SPECIAL_TOKENS, eos_token) if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the Molmo special tokens {missing}")
        # The official processor gets the image token ids by encoding their concatenation.
        ids = tokenizer.encode("".join(IMAGE_SPECIAL_TOKENS), add_special_tokens=False).ids
        if len(ids) != len(IMAGE_SPECIAL_TOKENS):
            raise ValueError(f"tokenizer splits the image special tokens into {len(ids)} ids, expected 5")
        (
            self.image_start_id,
            self.image_end_id,
            self.image_patch_id,
            self.image_col_id,
            self.image_prompt_id,
        ) = ids
        self.eos_id: int = tokenizer.token_to_id(eos_token)
        # OLMo/Molmo: no BOS token; the EOS token serves as BOS.
        self.bos_id: int = self.eos_id
        pad = tokenizer.token_to_id(pad_token)
        self.pad_id: int | None = pad
        self._special_ids = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "MolmoTokenizer":
        path = Path(path)
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on parse errors
            raise ValueError(f"cannot read tokenizer file {path}: {e}") from e
        eos, pad = EOS_TOKEN, PAD_TOKEN
        cfg_path = path.parent / "tokenizer_config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            eos = _token_str(cfg.get("eos_token")) or eos
            pad = _token_str(cfg.get("pad_token")) or pad
        return cls(tok, eos_token=eos, pad_token=pad)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "MolmoTokenizer":
        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (the checkpoint folder must hold tokenizer.json)")
        return cls.from_file(path)

    @classmethod
    def tiny(cls) -> "MolmoTokenizer":
        """The shipped tiny tokenizer (matches :meth:`MolmoeConfig.tiny`)."""
        return cls.from_file(TINY_TOKENIZER_PATH)

    # ---------------------------------------------------------------- use
    @property
    def backend(self) -> Tokenizer:
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (base vocabulary plus added tokens)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_ids(self) -> dict[str, int]:
        return {
            "eos_token_id": self.eos_id,
            "image_start_token_id": self.image_start_id,
            "image_end_token_id": self.image_end_id,
            "image_patch_token_id": self.image_patch_id,
            "image_col_token_id": self.image_col_id,
            "image_prompt_token_id": self.image_prompt_id,
        }

    def check_matches(self, config: MolmoeConfig) -> None:
        """Raise ValueError if the tokenizer's special ids disagree with ``config`` or exceed its
        embedding table."""
        wrong = [
            f"{name}: tokenizer {tid} vs config {getattr(config, name)}"
            for name, tid in self.token_ids().items()
            if getattr(config, name) != tid
        ]
        if wrong:
            raise ValueError("tokenizer and model config disagree on special token ids: " + "; ".join(wrong))
        if self.vocab_size > config.total_vocab_size:
            raise ValueError(
                f"tokenizer produces ids up to {self.vocab_size - 1} but the model embeds only "
                f"{config.total_vocab_size} ids"
            )

    def save_folder_files(self, folder: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (hub layout)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(folder / "tokenizer.json"))
        eos = self._tok.id_to_token(self.eos_id)
        pad = self._tok.id_to_token(self.pad_id) if self.pad_id is not None else None
        (folder / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "add_bos_token": False,
                    "add_eos_token": False,
                    "add_prefix_space": False,
                    "bos_token": None,
                    "eos_token": eos,
                    "pad_token": pad,
                    "unk_token": None,
                    "tokenizer_class": "GPTNeoXTokenizer",
                    "model_max_length": 1000000000000000019884624838656,
                },
                indent=2,
            )
        )
        (folder / "special_tokens_map.json").write_text(
            json.dumps(
                {
                    "additional_special_tokens": list(IMAGE_SPECIAL_TOKENS),
                    "bos_token": eos,
                    "eos_token": eos,
                    "pad_token": pad,
                    "unk_token": eos,
                },
                indent=2,
            )
        )


def _token_str(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Build the tiny MolmoE tokenizer (tokenizer.json).")
    parser.add_argument("out", nargs="?", default=str(TINY_TOKENIZER_PATH))
    args = parser.parse_args(argv)
    tok = build_tiny_tokenizer()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tok.save(args.out)
    print(f"wrote {args.out}: {tok.get_vocab_size()} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
