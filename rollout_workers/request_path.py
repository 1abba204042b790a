"""One request as a rollout worker serves it (DESIGN.md sections 2-4), on either execution engine
(rollout_workers/executors.py: the eager reference, or rollout_workers/fast_engine.py).

    bytes + question + budget
      -> preprocess (decode, size probe)                                     [preprocess_ms]
      -> Stage1: the question's ids and language feature; tier, p (tiers that
         would change nothing are masked)                                    [stage1_ms]
      -> crops at the chosen tier                                            [preprocess_ms]
      -> vision encoder + connector, input embeddings                        [vision_ms]
      -> [BOS, image, text, BUDGET TOKEN] through blocks 0..p-1, native top_k [prefix_ms]
      -> Stage2 on the latency token, budget, p, token count, spent fraction [stage2_ms]
      -> the selected blocks p.. at the chosen top_k                         [prefill_rest_ms]
      -> greedy decode with the same knobs, KV cache                          [decode_ms]
      -> detokenise                                                          [postprocess_ms]

The frozen model's answer is not perturbed by the budget token: causal attention means no earlier
position sees it; the first answer token is read from the position before it; its KV entries are
dropped before decoding and positions continue as if it were absent. So with fixed knobs, the
budget-token path and the plain path give the same logits at every generated step (tested).

Without a controller (`controller=None`, fixed knobs) the plain path runs: no language feature, no
budget token, one prefill over the selected blocks, no mid-prefill synchronisation. It is the "B" side
of the controller-overhead A/B and what static baselines use. (Its result still carries the question's
language feature, for records: computed after the request, outside its latency.)

On CUDA both decisions are made on the device by default (rollout_workers/device_stage1.py: the language
feature and Stage1 in one graph; rollout_workers/device_stage2.py: Stage2 right after the prefix); the
host reads back a few numbers. `device_stage1=False` / `device_stage2=False`, or fixed decisions, keep the
host act path (numpy) for that stage.

The decode overlap (`overlap_decode`, on with the device Stage1 path): Stage1 needs only the question's ids
and the image's size, which the header gives. So when a request decodes its image, this thread opens the header
(which the decode needs anyway) and hands the size to a helper thread, which runs the Stage1 window (tokenising
the question, the tiers' token counts, then the device decision: ids into the pinned buffer, the weights'
check, the draws, the graph's replay) while this thread decodes: Pillow's decoders release the GIL. The
stage1_ms segment then holds only the read-back; the window's time is inside preprocess_ms. (The helper must
not run Python while this thread does: the two would take turns at the GIL. Opening the header in the helper
too cost this thread 0.3 ms of GIL waits on an H100 host.) The controller-overhead A/B and
`bench/decode_overlap_ab.py` measure what it hides (docs/PERFORMANCE.md).

Shared preprocessing (`reuse_preprocess=True`, what rollout workers use): a GRPO group runs G requests
on the same image bytes and question, and their preprocessing (decoding, size probe; the crops of each
tier) is the same work on the same input. It is done once; each later request on the same inputs reuses
it and is charged the time the first one measured, so the latency the budget applies to is unchanged,
but a worker decodes each image once per group, not G times. Only the same bytes object is recognised
(identity, no hashing). The question's token ids are kept with it (the language feature is computed in
every request's Stage1 window, on the device, or on the host and then kept too).
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from PIL import Image

from shared.backend import SampleError
from shared.controller import (HeadDecision, Stage1Features, Stage2Features, TwoStageController, check_budget_ms,
                               uniform_pair)
from shared.knobs import ImportanceScores, KnobChoice, KnobSpace, select_blocks
from rollout_workers.executors import EagerEngine
from rollout_workers.helper_thread import Pending, run_in_helper
from rollout_workers.molmoe.preprocessing import decode_image, open_image, probe_image_size
from rollout_workers.timers import SegmentTimer

SEGMENT_ORDER = ("preprocess_ms", "stage1_ms", "vision_ms", "prefix_ms", "stage2_ms", "prefill_rest_ms",
                 "decode_ms", "postprocess_ms")


@dataclass
class _PreprocessMemo:
    """The preprocessing of one (image bytes, question) and its measured times (ms)."""
    image: Optional[bytes]
    question: str
    rgb: Optional[np.ndarray]
    tier_tokens: list[int]
    part1_ms: float
    question_ids: Optional[list[int]] = None
    lang_feat: Optional[np.ndarray] = None
    crops: dict = field(default_factory=dict)      # max_crops -> (preprocessed inputs, ms)


@dataclass
class _Stage1Window:
    """What the Stage1 window in the helper thread did: the question's ids, the tiers' token counts for the
    header's size, Stage1's two draws (None: greedy), and whether the decision was queued (not when the question
    is too long for the device path)."""
    q_ids: list[int]
    tier_tokens: list[int]
    uniforms: Optional[tuple[float, float]]
    queued: bool
    decision: Optional[tuple] = None        # Stage1's (tier index, its log-prob, p index, its log-prob), if read


@dataclass
class RequestResult:
    answer: str
    answer_ids: list[int]
    knobs: KnobChoice
    block_ids: list[int]
    tier: HeadDecision
    p: HeadDecision
    top_k: HeadDecision
    num_blocks: HeadDecision
    stage1: Stage1Features
    stage2: Stage2Features
    num_crops: int
    vision_tokens: int
    prompt_tokens: int
    segments_ms: dict[str, float]
    latency_ms: float
    host_latency_ms: float
    t_start: float
    t_end: float
    # preprocess_ms in its two parts: (decode and size probe; crops at the chosen tier), charged reuse included
    preprocess_parts_ms: tuple[float, float] = (0.0, 0.0)
    step_logits: list[torch.Tensor] = field(default_factory=list)


class RequestEngine:
    """Serves single requests of a loaded MolmoE model (batch size 1).

    Args:
        model: a `MolmoeModel` (eval mode, on its device).
        preprocessor: its `MolmoPreprocessor` (holds the tokenizer).
        space: the knob space; must match the model's shape.
        importance: per-block importance scores for block selection.
        executor: how the blocks run (default: `EagerEngine(model)`; or a `FastEngine`).
        reuse_preprocess: reuse the last request's preprocessing when the next one has the same image
            bytes object and question, charging its measured time (module docstring). Off by default
            (benchmarks time every request's preprocessing afresh); rollout workers turn it on.
        spin_wait: on CUDA, wait for the latency token by polling an event rather than blocking in the
            driver (the variant measured in docs/PERFORMANCE.md).
        device_stage2: decide Stage2 on the device, queued right after the prefix
            (rollout_workers/device_stage2.py): the host reads back six numbers instead of running the
            controller between the prefix and the rest of the prefill. Default: on CUDA with Triton. Not
            used with `fixed` decisions (they keep the host path).
        device_stage1: compute the language feature and decide Stage1 on the device in one graph
            (rollout_workers/device_stage1.py): the host reads back four numbers. Default: on CUDA. Not
            used with `fixed` decisions, nor for questions longer than its buffer (host path).
        early_rest_prefill: with Stage2 on the device and an engine whose top_k is device data (the fast
            engine), queue Stage2's top_k into the blocks' device memory and the blocks that run under every
            num_blocks option (from p up to the first block some option drops) before waiting for the decision,
            so that the GPU is not idle while the host reads it; the stage2 segment then ends when Stage2 is
            queued, and those blocks count in the rest of the prefill. Default: on when both hold (an H100: the
            GPU's wait after Stage2 62 -> 13 us on its own clock, the controlled path 0.08 ms faster;
            docs/PERFORMANCE.md).
        stage1_read_in_helper: with the decode overlap, the helper thread also waits for Stage1's decision (in the
            driver, without the GIL) and reads it back, under the image decode; the request thread then finds it
            in the window's result instead of reading it between the preprocess and stage1 marks, where the GPU
            has nothing to do. Default: on with the overlap (an H100: stage1 segment 0.064 -> 0.036 ms, the
            decode step unchanged; docs/PERFORMANCE.md).
    """

    def __init__(self, model, preprocessor, space: KnobSpace, importance: ImportanceScores, executor=None,
                 reuse_preprocess: bool = False, spin_wait: bool = True, device_stage2: Optional[bool] = None,
                 device_stage1: Optional[bool] = None, overlap_decode: Optional[bool] = None,
                 early_rest_prefill: Optional[bool] = None, stage1_read_in_helper: Optional[bool] = None):
        cfg = model.config
        if (space.num_layers, space.num_experts, space.native_top_k) != (cfg.n_layers, cfg.num_experts, cfg.top_k):
            raise ValueError(f"knob space is for {space.num_layers} blocks x {space.num_experts} experts (native top_k "
                             f"{space.native_top_k}), the model has {cfg.n_layers} x {cfg.num_experts} "
                             f"(top_k {cfg.top_k}): set model.num_layers/num_experts/native_top_k to match")
        if importance.num_layers != cfg.n_layers:
            raise ValueError(f"importance scores cover {importance.num_layers} blocks, the model has {cfg.n_layers}")
        self.model = model.eval()
        self.pre = preprocessor
        self.tok = preprocessor.tokenizer
        self.space = space
        self.importance = importance
        self.device = model.device
        self.executor = executor if executor is not None else EagerEngine(model)
        self.reuse_preprocess = bool(reuse_preprocess)
        self.spin_wait = bool(spin_wait)
        self._pinned_bufs: dict[str, torch.Tensor] = {}
        self._budget_tok: Optional[tuple] = None           # (controller, its token key, the token on the device)
        self._memo: Optional[_PreprocessMemo] = None
        self.preprocess_reused = 0          # requests that reused a memo (part 1), for reports
        self.stage2_on_device = None
        if device_stage2 is None:
            from rollout_workers import triton_kernels
            device_stage2 = triton_kernels.available(self.device)
        if device_stage2:
            from rollout_workers.device_stage2 import DeviceStage2
            self.stage2_on_device = DeviceStage2(self.device, space, model.dtype, cfg.d_model,
                                                 compile=bool(getattr(self.executor, "compile", False)))
        self.stage1_on_device = None
        if device_stage1 is None:
            device_stage1 = self.device.type == "cuda"
        if device_stage1:
            from rollout_workers.device_stage1 import DeviceStage1
            self.stage1_on_device = DeviceStage1(self.device, space, model.embed_tokens, cfg.d_model,
                                                 compile=bool(getattr(self.executor, "compile", False)))
        # Stage1's host window in a helper thread under the image decode (module docstring); needs the device
        # Stage1 path, whose only inputs are the question's ids and the image's size (read from the header)
        self.overlap_decode = (self.stage1_on_device is not None) if overlap_decode is None else bool(overlap_decode)
        if self.overlap_decode and self.stage1_on_device is None:
            raise ValueError("overlap_decode needs the device Stage1 path (device_stage1=True)")
        self.decode_overlapped = 0          # requests whose Stage1 window ran under their image decode
        self.stage1_read_in_helper = self.overlap_decode if stage1_read_in_helper is None else bool(stage1_read_in_helper)
        if self.stage1_read_in_helper and not self.overlap_decode:
            raise ValueError("stage1_read_in_helper needs the decode overlap (overlap_decode=True)")
        self.stage1_read_by_helper = 0      # requests whose Stage1 decision the helper read (for reports, tests)
        can_early = bool(getattr(self.executor, "device_top_k", False))
        self.early_rest_prefill = (can_early and self.stage2_on_device is not None if early_rest_prefill is None
                                   else bool(early_rest_prefill) and can_early)
        if early_rest_prefill and not self.early_rest_prefill:
            raise ValueError("early_rest_prefill needs an engine whose top_k is device data (the fast engine)")
        self.early_blocks_queued = 0        # blocks queued before the Stage2 decision was read (for reports, tests)

    # ------------------------------------------------------------------------------------------
    def question_ids(self, question: str) -> list[int]:
        """The question text's token ids (what the language feature averages); a SampleError if none."""
        ids = self.tok.encode(question)
        if not ids:
            raise SampleError("the question tokenises to nothing")
        return ids

    @torch.no_grad()
    def language_feature(self, question: str, ids: Optional[list[int]] = None) -> np.ndarray:
        """Mean word embedding of the question text (frozen LLM table): [d_model] float32."""
        ids = self.question_ids(question) if ids is None else ids
        emb = self.model.embed_tokens(torch.tensor(ids, device=self.device))
        return emb[0].float().mean(0).cpu().numpy()

    @torch.no_grad()
    def token_rms(self) -> float:
        """RMS of the frozen word embeddings (the budget token's scale)."""
        w = self.model.llm.model.embed_tokens.weight
        return float(w.float().pow(2).mean().sqrt())

    def _pinned(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """A page-locked host buffer shaped like `like`, kept per name (a copy into it can be queued without
        blocking the host; it is read only after the copy's event has completed)."""
        buf = self._pinned_bufs.get(name)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            buf = self._pinned_bufs[name] = torch.empty(like.shape, dtype=like.dtype, pin_memory=True)
        return buf

    def _budget_token_on_device(self, controller: TwoStageController, budget_ms: float) -> torch.Tensor:
        """The budget token [D] on the device in the model's dtype. The last one is kept: a GRPO group's G
        rollouts share their budget, so 7 of 8 skip computing it and its upload. On CUDA the upload is
        queued from pinned memory (non-blocking), so it may be made after the vision encoder is queued: a
        copy from pageable memory would wait for the encoder. Used read-only (the prefix concatenates it
        into a new tensor)."""
        key = controller.budget_token_key(budget_ms)
        kept = self._budget_tok
        if kept is not None and kept[0] is controller and kept[1] == key:
            return kept[2]
        tok = controller.budget_token_embedding(budget_ms)
        if self.device.type == "cuda":     # the host allocator keeps the pinned block until the copy is done
            tok = tok.pin_memory().to(self.device, non_blocking=True)
        tok = tok.to(dtype=self.model.dtype)
        self._budget_tok = (controller, key, tok)
        return tok

    def _latency_state_and_elapsed(self, row: torch.Tensor, timer: SegmentTimer) -> tuple[np.ndarray, float]:
        """The latency token's state [D] as a float32 numpy copy, and the request's elapsed ms, with one
        wait for the GPU (on CUDA: a copy to pinned memory queued before the timer's event, which the host
        polls with `spin_wait`; before, `.cpu()` and the timer's own synchronisation were two waits:
        ~0.1 ms more of GPU idle time per request on an H100 host, docs/PERFORMANCE.md). Always a copy: on
        CPU the row may be a view of an engine buffer that the rest of the prefill overwrites in place (the
        recorded state must stay)."""
        if self.device.type != "cuda":
            state = row.cpu().float().numpy().copy()
            return state, timer.elapsed_ms()
        stage = self._pinned("latency_state", row)
        stage.copy_(row, non_blocking=True)
        # the timer's event follows the copy: when it has completed, so has the copy
        elapsed = timer.elapsed_ms(spin=self.spin_wait)
        return stage.float().numpy().copy(), elapsed

    def _may_overlap(self, image_bytes, controller, fixed) -> bool:
        """Whether this request's Stage1 window may run in the helper thread under its image decode: the
        controller decides on the device and the image comes as bytes to decode (a question too long for
        the device path still takes the sequential path)."""
        return (self.overlap_decode and controller is not None and fixed is None
                and isinstance(image_bytes, (bytes, bytearray, memoryview)))

    def _probe_size(self, image_bytes: bytes):
        """The opened header (a PIL image, pixels not decoded) and the (width, height) the decode will give;
        a SampleError for a bad image."""
        try:
            header = open_image(image_bytes, self.pre.limits)
            # never a full decode here: that is what the window overlaps (a PNG's late eXIf chunk: see serve)
            return header, probe_image_size(header, self.pre.limits, self.pre.apply_exif_orientation,
                                            exif_before_pixels_only=True)
        except (ValueError, TypeError) as exc:
            raise SampleError(f"bad image: {exc}") from exc

    def _overlapped_stage1(self, question: str, size: tuple[int, int], controller, budget_ms: float, greedy: bool,
                           generator) -> Pending:
        """Start the Stage1 window in the helper thread, to run while the caller decodes the image (Pillow's
        decoders release the GIL): the question's ids, the tiers' token counts for the header's `size`, and the
        device decision queued on this thread's CUDA stream. Returns the pending `_Stage1Window` (not the
        decision: `DeviceStage1.result` reads that). The hand-off is a queue put and get (helper_thread.py), not a
        ThreadPoolExecutor, whose submit and result cost the request thread ~0.05 ms more (CPU machine,
        bench/handoff_probe.py)."""
        dev_s1, space = self.stage1_on_device, self.space
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

        def window() -> _Stage1Window:
            q_ids = self.question_ids(question)
            counts = self.pre.tier_token_counts(size[0], size[1], space.tier_max_crops)
            tier_tokens = [int(c[1]) for c in counts]
            if not dev_s1.fits(len(q_ids)):      # a question too long for the device path: Stage1 after the decode
                return _Stage1Window(q_ids, tier_tokens, None, queued=False)
            with torch.no_grad(), (torch.cuda.stream(stream) if stream is not None else nullcontext()):
                dev_s1.prepare(controller, budget_ms)
                uniforms = None if greedy else uniform_pair(generator)
                dev_s1.queue(q_ids, tier_tokens, space.tier_mask(tier_tokens), [True] * len(space.positions),
                             uniforms)
            # waiting in the driver releases the GIL: the request thread's decode goes on meanwhile
            decision = dev_s1.result(spin=False) if self.stage1_read_in_helper else None
            return _Stage1Window(q_ids, tier_tokens, uniforms, queued=True, decision=decision)

        return run_in_helper(window)

    def _always_run_blocks(self, p: int, nb_mask) -> list[int]:
        """Blocks p, p+1, ... up to (not including) the first one that some feasible num_blocks option drops:
        they run, in this order, whatever Stage2 decides (the options' block sets are nested)."""
        space = self.space
        fewest = min(nb for nb, ok in zip(space.num_blocks, nb_mask) if ok)
        kept = set(select_blocks(p, fewest, self.importance.scores))
        out = []
        for b in range(p, space.num_layers):
            if b not in kept:
                break
            out.append(b)
        return out

    def _decode_image(self, image_bytes):
        """RGB uint8 [H, W, 3] from image bytes (or a header from `_probe_size`); a SampleError if bad."""
        if image_bytes is None:
            return None
        try:
            if isinstance(image_bytes, Image.Image):
                return decode_image(image_bytes, self.pre.limits, self.pre.apply_exif_orientation)
            return self.pre.load_image(image_bytes)
        except (ValueError, TypeError) as exc:   # ImageDecodeError, not bytes: bad input, skipped and counted
            raise SampleError(f"bad image: {exc}") from exc

    @torch.no_grad()
    def serve(self, image_bytes: Optional[bytes], question: str, budget_ms: float,
              controller: Optional[TwoStageController] = None, *, fixed: Optional[KnobChoice] = None,
              greedy: bool = False, generator: Optional[torch.Generator] = None, max_new_tokens: int = 16,
              return_logits: bool = False, stop_at_eos: bool = True) -> RequestResult:
        """Answer one request. With a controller the budget-token path runs (its decisions, or `fixed`
        decisions if given); without one, `fixed` knobs run on the plain path. `stop_at_eos=False`
        decodes exactly max_new_tokens (benchmarks with fixed answer length)."""
        if controller is None and fixed is None:
            raise ValueError("serve() needs a controller or fixed knobs")
        budget_ms = check_budget_ms(budget_ms)
        if not isinstance(question, str) or not question.strip():
            raise SampleError("empty question")
        space, model = self.space, self.model
        t_start = time.time()
        host0 = time.perf_counter()
        timer = SegmentTimer(self.device)
        dev_s2 = self.stage2_on_device if controller is not None and fixed is None else None
        if dev_s2 is not None:
            dev_s2.start()

        # -- preprocess (part 1): decode, probe size ---------------------------------------------
        memo = self._memo
        if not (self.reuse_preprocess and memo is not None and memo.image is image_bytes
                and memo.question == question):
            memo = None
        q_ids: Optional[list[int]] = None
        lang_feat: Optional[np.ndarray] = None
        stage1_job = None                   # the Stage1 window, queued in the helper thread under the decode
        s1_uniforms = None                  # Stage1's two draws (kept if it must decide again)
        charged_parts_ms = [0.0, 0.0]       # preprocessing reused from the memo, (part 1, part 2)
        if memo is None and self._may_overlap(image_bytes, controller, fixed):
            # the header is opened here (the decode needs it anyway); the rest of the window runs in the helper
            header, size = self._probe_size(image_bytes)
            stage1_job = self._overlapped_stage1(question, size, controller, budget_ms, greedy, generator)
            try:
                rgb = self._decode_image(header)
            except BaseException:
                # the decode's error is the one to report; a decision the helper queued is still waited for, since
                # the next request writes the buffer its graph reads
                if stage1_job.exception() is None and stage1_job.result().queued:
                    self.stage1_on_device.result(spin=False)
                raise
            window = stage1_job.result()    # the window has run (its errors, a question of no ids, raised here)
            q_ids = window.q_ids
            h_px, w_px = rgb.shape[:2]
            if window.queued and (w_px, h_px) == size:
                tier_tokens = window.tier_tokens
                self.decode_overlapped += 1
            else:
                # not queued: a question too long for the device path (Stage1 takes the host path below); or an
                # EXIF rotation the header did not show (a PNG's eXIf chunk after its pixels): the queued decision
                # saw the wrong tier token counts; it is waited for and dropped, and Stage1 runs again after the
                # decode, as without the overlap, with the same draws
                if window.queued:
                    self.stage1_on_device.result(spin=False)
                    s1_uniforms = window.uniforms
                stage1_job = None
                counts = self.pre.tier_token_counts(w_px, h_px, space.tier_max_crops)
                tier_tokens = [int(c[1]) for c in counts]
        elif memo is None:
            rgb = self._decode_image(image_bytes)
            if rgb is not None:
                h_px, w_px = rgb.shape[:2]
                counts = self.pre.tier_token_counts(w_px, h_px, space.tier_max_crops)
                tier_tokens = [int(c[1]) for c in counts]
            else:
                tier_tokens = [0] * space.num_tiers
        else:
            rgb, tier_tokens = memo.rgb, list(memo.tier_tokens)
            q_ids, lang_feat = memo.question_ids, memo.lang_feat
            timer.charge("preprocess_ms", memo.part1_ms)
            charged_parts_ms[0] = memo.part1_ms
            self.preprocess_reused += 1
        f1 = Stage1Features(lang_feat=lang_feat, budget_ms=budget_ms, tier_tokens=tier_tokens,
                            tier_mask=space.tier_mask(tier_tokens), p_mask=[True] * len(space.positions))
        timer.mark("preprocess_ms")

        # -- Stage1: the controller's input (the question's ids and language feature), tier and p -------
        dev_s1 = None
        if controller is not None:
            if q_ids is None:
                q_ids = self.question_ids(question)
            dev_s1 = self.stage1_on_device
            if fixed is not None or dev_s1 is None or not dev_s1.fits(len(q_ids)):
                dev_s1 = None
                if f1.lang_feat is None:
                    f1.lang_feat = self.language_feature(question, q_ids)
        if fixed is not None:
            ti, pi, ki, ni = space.index_of(fixed)
            if not f1.tier_mask[ti]:        # a collapsed tier runs as the cheapest equal tier
                ti = tier_tokens.index(tier_tokens[ti])
            d_tier, d_p = HeadDecision(ti, 0.0), HeadDecision(pi, 0.0)
        elif stage1_job is not None:        # queued under the decode: only the read-back is left (or not even that)
            if window.decision is not None:
                t_idx, lp_t, p_idx, lp_p = window.decision
                self.stage1_read_by_helper += 1
            else:
                t_idx, lp_t, p_idx, lp_p = dev_s1.result(spin=self.spin_wait)
            d_tier, d_p = HeadDecision(t_idx, lp_t), HeadDecision(p_idx, lp_p)
        elif dev_s1 is not None:            # decided in the stream; the host reads the decision back
            dev_s1.prepare(controller, budget_ms)
            if not greedy and s1_uniforms is None:
                s1_uniforms = uniform_pair(generator)
            dev_s1.queue(q_ids, tier_tokens, f1.tier_mask, f1.p_mask, None if greedy else s1_uniforms)
            t_idx, lp_t, p_idx, lp_p = dev_s1.result(spin=self.spin_wait)
            d_tier, d_p = HeadDecision(t_idx, lp_t), HeadDecision(p_idx, lp_p)
        else:
            d_tier, d_p = controller.act_stage1(f1, greedy=greedy, generator=generator)
        p = space.positions[d_p.index]
        max_crops = space.tier_max_crops[d_tier.index]
        timer.mark("stage1_ms")

        # -- preprocess (part 2): crops at the chosen tier ----------------------------------------
        crops_hit = memo.crops.get(max_crops) if memo is not None else None
        if crops_hit is None:
            inputs = self.pre.preprocess(question, rgb, max_crops=max_crops,
                                         device=self.executor.preprocess_device).to(self.device)
        else:
            inputs = crops_hit[0]
            timer.charge("preprocess_ms", crops_hit[1])
            charged_parts_ms[1] = crops_hit[1]
        if inputs.num_tokens > model.config.max_sequence_length:
            raise SampleError(f"prompt of {inputs.num_tokens} tokens exceeds the model's context of "
                              f"{model.config.max_sequence_length}")
        timer.mark("preprocess_ms")

        # -- vision ---------------------------------------------------------------------------
        ex = self.executor
        x = ex.encode(inputs)
        T = x.shape[1]
        timer.mark("vision_ms")

        step_logits: list[torch.Tensor] = []
        ex.begin()
        if controller is not None:
            # the budget token and Stage2's device copies (uploads, non-blocking, only when the budget or
            # the weights changed): made here, while the GPU runs the vision encoder, not in the Stage1
            # window where the GPU waits for the host
            budget_tok = self._budget_token_on_device(controller, budget_ms)
            nb_mask = space.num_blocks_feasible(p)
            if dev_s2 is not None:      # Stage2's inputs other than the latency token go up before the prefix
                dev_s2.prepare(controller, budget_ms)
                uniforms = None if greedy else uniform_pair(generator)
                dev_s2.set_inputs(p_idx=d_p.index, vision_tokens=tier_tokens[d_tier.index],
                                  charged_ms=sum(timer.charged_ms.values()), budget_ms=budget_ms, uniforms=uniforms,
                                  nb_mask=nb_mask)
            # -- prefix: blocks 0..p-1 at native top_k, budget token appended as the last position
            x = torch.cat([x, budget_tok.to(x.dtype)[None, None, :]], dim=1)
            h = ex.prefill(x, list(range(p)), {})
            timer.mark("prefix_ms")
            # -- Stage2 (host sync: the decision needs the latency token and the elapsed time)
            early: list[int] = []
            if dev_s2 is not None:      # decided in the stream; the host reads the decision back
                dev_s2.queue(h[0, -1])
                if self.early_rest_prefill:
                    early = self._always_run_blocks(p, nb_mask)
                if early:               # queued before the decision is read: they run under every option
                    timer.mark("stage2_ms")
                    ex.write_top_k_on_device(p, dev_s2.top_k_index_on_device(), space.top_ks)
                    h = ex.prefill(h, early, None)
                    self.early_blocks_queued += len(early)
                k_idx, lp_k, nb_idx, lp_nb, spent_frac, _ = dev_s2.result(spin=self.spin_wait)
                d_k, d_nb = HeadDecision(k_idx, lp_k), HeadDecision(nb_idx, lp_nb)
                f2 = Stage2Features(latency_state=None, p_idx=d_p.index, vision_tokens=tier_tokens[d_tier.index],
                                    spent_frac=float(spent_frac), nb_mask=nb_mask)     # the state after finish()
            else:
                latency_state, elapsed_ms = self._latency_state_and_elapsed(h[0, -1], timer)
                f2 = Stage2Features(latency_state=latency_state, p_idx=d_p.index,
                                    vision_tokens=tier_tokens[d_tier.index], spent_frac=float(elapsed_ms / budget_ms),
                                    nb_mask=nb_mask)
                if fixed is not None:
                    d_k, d_nb = HeadDecision(ki, 0.0), HeadDecision(ni, 0.0)
                else:
                    d_k, d_nb = controller.act_stage2(budget_ms, f2, greedy=greedy, generator=generator)
            top_k = space.top_ks[d_k.index]
            nb = space.num_blocks[d_nb.index]
            block_ids = select_blocks(p, nb, self.importance.scores)
            k_map = {b: top_k for b in block_ids if b >= p}
            rest = block_ids[p + len(early):]
            if early:
                if block_ids[p:p + len(early)] != early:
                    raise RuntimeError(f"blocks {early} were queued as always-run, the decision runs {block_ids}")
                ex.note_top_k(p, top_k)
            else:
                timer.mark("stage2_ms")
            # -- rest of the prefill; first answer token from the position BEFORE the budget token
            h = ex.prefill(h, rest, {b: top_k for b in rest})
            if dev_s2 is not None:
                dev_s2.queue_state_copy()
            logits = ex.head(h[:, T - 1:T])
            ex.truncate(T, block_ids)
            timer.mark("prefill_rest_ms")
        else:
            ti, pi, ki, ni = space.index_of(fixed)
            top_k = space.top_ks[ki]
            nb = space.num_blocks[ni]
            block_ids = select_blocks(p, nb, self.importance.scores)
            k_map = {b: top_k for b in block_ids if b >= p}
            f2 = Stage2Features(latency_state=np.zeros(model.config.d_model, dtype=np.float32), p_idx=pi,
                                vision_tokens=tier_tokens[d_tier.index], spent_frac=0.0,
                                nb_mask=space.num_blocks_feasible(p))
            d_k, d_nb = HeadDecision(ki, 0.0), HeadDecision(ni, 0.0)
            h = ex.prefill(x, block_ids, k_map)
            logits = ex.head(h[:, -1:])
            timer.mark("prefill_rest_ms")

        # -- decode: same knobs; prefix blocks at native top_k ------------------------------------
        eos = model.config.eos_token_id
        greedy_decode = getattr(ex, "greedy_decode", None)     # the fast engine's device-side greedy loop
        device_loop = None
        if greedy_decode is not None and not return_logits:
            device_loop = greedy_decode(logits, T, block_ids, k_map, max_new_tokens, eos if stop_at_eos else None)
        out_ids: list[int] = device_loop if device_loop is not None else []
        for step in range(max_new_tokens if device_loop is None else 0):
            if return_logits:
                step_logits.append(logits[0, -1].to("cpu", torch.float32, copy=True))   # engines may reuse the buffer
            next_id = int(logits[0, -1].argmax())          # host sync: end-of-sequence check
            out_ids.append(next_id)
            if (stop_at_eos and next_id == eos) or step == max_new_tokens - 1:
                break
            logits = ex.decode_step(next_id, T + step, block_ids, k_map)
        timer.mark("decode_ms")

        # -- postprocess ---------------------------------------------------------------------
        answer = self.tok.decode([i for i in out_ids if i != eos])
        timer.mark("postprocess_ms")
        segments = timer.finish()
        if dev_s2 is not None:
            f2.latency_state = dev_s2.latency_state()
        if dev_s1 is not None:
            f1.lang_feat = dev_s1.lang_feat()
        elif f1.lang_feat is None:          # the plain path: for the record, outside the request's latency
            f1.lang_feat = self.language_feature(question, q_ids)
        pre_ms = [ms for name, ms in timer.deltas if name == "preprocess_ms"]        # [part 1, part 2]
        if self.reuse_preprocess:
            if memo is None:
                memo = _PreprocessMemo(image_bytes, question, rgb, list(tier_tokens), pre_ms[0])
            memo.question_ids = q_ids if q_ids is not None else memo.question_ids
            if memo.lang_feat is None:
                memo.lang_feat = f1.lang_feat
            if crops_hit is None:
                memo.crops[max_crops] = (inputs, pre_ms[1])
            self._memo = memo
        for name in SEGMENT_ORDER:
            segments.setdefault(name, 0.0)
        knobs = space.choice(d_tier.index, d_p.index, d_k.index, d_nb.index)
        return RequestResult(answer=answer, answer_ids=out_ids, knobs=knobs, block_ids=list(block_ids), tier=d_tier,
                             p=d_p, top_k=d_k, num_blocks=d_nb, stage1=f1, stage2=f2, num_crops=inputs.num_crops,
                             vision_tokens=inputs.num_image_tokens, prompt_tokens=T, segments_ms=segments,
                             latency_ms=timer.total_ms(), host_latency_ms=(time.perf_counter() - host0) * 1e3,
                             t_start=t_start, t_end=time.time(),
                             preprocess_parts_ms=(pre_ms[0] + charged_parts_ms[0], pre_ms[1] + charged_parts_ms[1]),
                             step_logits=step_logits)

