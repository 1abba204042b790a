"""The MolmoE rollout backend: the frozen model served by `RequestEngine`, behind `RolloutBackend`."""
from __future__ import annotations

import io
import tempfile
from typing import Optional

import numpy as np
import torch

from rollout_workers.executors import EagerEngine
from rollout_workers.request_path import RequestEngine
from shared.backend import BackendInfo, RolloutBackend, RolloutOutcome, Sample
from shared.controller import TwoStageController
from shared.knobs import ImportanceScores, KnobChoice, KnobSpace


def word_level_tokenizer(cfg, words=()):
    """A word-level tokenizer whose special-token ids match `cfg` (for RANDOM full-size weights, which
    ship no tokenizer; the real checkpoint folder carries its own). Unknown words map to [UNK]."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    from rollout_workers.molmoe.config import EOS_TOKEN, IMAGE_SPECIAL_TOKENS, PAD_TOKEN
    from rollout_workers.molmoe.tokenizer import MolmoTokenizer
    base = ["User:", "Assistant:", "what", "is", "the", "of", "in", "how", "many", "colour", "color", "shape",
            "small", "large", "circle", "square", "triangle", "red", "green", "blue", "yes", "no", "?"]
    vocab = {w: i + 2 for i, w in enumerate(sorted(set(base) | set(words)))}
    vocab["[UNK]"] = 0
    specials = {EOS_TOKEN: cfg.eos_token_id, PAD_TOKEN: cfg.pad_token_id}
    specials.update(dict(zip(IMAGE_SPECIAL_TOKENS, (cfg.image_start_token_id, cfg.image_end_token_id,
                                                    cfg.image_patch_token_id, cfg.image_col_token_id,
                                                    cfg.image_prompt_token_id))))
    vocab.update(specials)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
    return MolmoTokenizer(tok)


def _device_name(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({threads} torch threads)"


class MolmoeBackend(RolloutBackend):
    def __init__(self, engine: RequestEngine, *, model_id: str, engine_name: str = "eager", torch_threads: int = 1):
        self.engine = engine
        self.space = engine.space
        self.model_id = model_id
        self.engine_name = engine_name
        self._info = BackendInfo(backend="molmoe", model_id=model_id, engine=engine_name,
                                 device=_device_name(engine.device, torch_threads), d_model=engine.model.config.d_model,
                                 token_rms=engine.token_rms(), importance_sha256=engine.importance.sha256())

    @classmethod
    def from_config(cls, cfg, space: KnobSpace, worker_id: int = 0) -> "MolmoeBackend":
        from rollout_workers.molmoe.loader import load_molmoe
        from rollout_workers.molmoe.make_tiny_checkpoint import make_tiny_checkpoint
        m = cfg.model
        want_cuda = m.device == "cuda" or (m.device == "auto" and torch.cuda.is_available())
        if m.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("model.device is 'cuda' but no CUDA device is visible")
        device = torch.device("cuda" if want_cuda else "cpu")
        dtype = getattr(torch, m.dtype)
        if m.checkpoint:
            bundle = load_molmoe(m.checkpoint, device, dtype)
        elif m.random_weights == "full":
            from rollout_workers.molmoe.config import MolmoeConfig
            from rollout_workers.molmoe.loader import Molmoe, random_full_size
            from rollout_workers.molmoe.preprocessing import MolmoPreprocessor
            full = MolmoeConfig.full()
            model = random_full_size(device, dtype, seed=cfg.system.seed)
            tok = word_level_tokenizer(full)
            bundle = Molmoe(model, tok, MolmoPreprocessor(full, tok))
        elif m.random_weights == "tiny":
            with tempfile.TemporaryDirectory(prefix="tiny-molmoe-") as tmp:   # read fully, then removed
                bundle = load_molmoe(make_tiny_checkpoint(tmp, seed=cfg.system.seed), device, dtype)
        else:
            raise ValueError("model.checkpoint is empty: point it at a checkpoint folder laid out like the hub's "
                             "(or set model.random_weights=tiny for a random test model, or full for RANDOM "
                             "full-size weights, which only time correctly)")
        mc = bundle.model.config
        importance = (ImportanceScores.load(m.importance_scores, mc.n_layers) if m.importance_scores
                      else ImportanceScores.by_index(mc.n_layers))
        if m.engine == "fast":
            from rollout_workers.fast_engine import FastEngine
            executor = FastEngine(bundle.model, max_len=m.fast_max_len,
                                  prefill_bucket=m.fast_prefill_bucket, top_k_max=max(space.top_ks),
                                  triton={"auto": None, "on": True, "off": False}[m.fast_triton])
        else:
            executor = EagerEngine(bundle.model)
        engine = RequestEngine(bundle.model, bundle.preprocessor, space, importance, executor=executor,
                               reuse_preprocess=m.reuse_group_preprocess)
        return cls(engine, model_id=m.model_id, engine_name=m.engine, torch_threads=cfg.system.torch_threads)

    def info(self) -> BackendInfo:
        return self._info

    def warmup(self, num_rollouts: int, controller: TwoStageController) -> None:
        """Capture the engine's graphs for every knob setting (fast engine), then unmeasured requests over
        every tier (allocator, kernels, caches)."""
        self.warmup_report = self.engine.executor.warmup(self.space, importance=self.engine.importance)
        rng = np.random.default_rng(0)
        from PIL import Image
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buf, "PNG")
        for i in range(num_rollouts):
            self.engine.serve(buf.getvalue(), "what is in the image", 1e6, controller, max_new_tokens=4)

    def run(self, sample: Sample, budget_ms: float, controller: TwoStageController, *, greedy: bool = False,
            generator: Optional[torch.Generator] = None, fixed: Optional[KnobChoice] = None) -> RolloutOutcome:
        r = self.engine.serve(sample.image, sample.question, budget_ms, controller, fixed=fixed, greedy=greedy,
                              generator=generator, max_new_tokens=sample.max_new_tokens)
        return RolloutOutcome(stage1=r.stage1, stage2=r.stage2, tier=r.tier, p=r.p, top_k=r.top_k,
                              num_blocks=r.num_blocks, knobs=r.knobs, num_crops=r.num_crops,
                              vision_tokens=r.vision_tokens, prompt_tokens=r.prompt_tokens,
                              answer_tokens=len(r.answer_ids), segments_ms=r.segments_ms, latency_ms=r.latency_ms,
                              answer=r.answer, t_start=r.t_start, t_end=r.t_end)

