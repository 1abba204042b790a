"""The GRPO update over recorded rollouts (plain torch; the Ray `Learner` wraps it).

`GRPOTrainer.update(rows)` takes the rows of complete groups (dicts with the record schema's fields),
computes group-relative advantages, drops zero-variance groups (counted), and runs `epochs` x
`minibatches` clipped-ratio updates. The importance ratio is taken against the behaviour log-prob the
worker recorded (`behavior_logp`); the new log-prob is recomputed from recorded features by
`TwoStageController.log_prob`. It fills each row's learner-owned fields (`step`, `advantage`,
`ratio_first`), bumps the step and the policy version, and returns per-update statistics.

The learning rate of update u (0-based) follows `grpo.lr_schedule` over `total_updates`: constant, or a
cosine / linear decay from `lr` to `lr * lr_final_frac` (`lr_factor`); a resumed run continues it from
the restored step.
"""
from __future__ import annotations

import copy
import math
import random
from typing import Any, Sequence

import numpy as np
import torch

from learner import grpo
from shared.controller import HEADS, TwoStageController, collate_features


def lr_factor(schedule: str, update: int, total_updates: int, final_frac: float) -> float:
    """Learning rate of update `update` (0-based) / the base lr: 1 for "constant"; for "cosine" and
    "linear" a decay from 1 at update 0 towards `final_frac`, reached at `total_updates` (held after it)."""
    if schedule == "constant":
        return 1.0
    if total_updates <= 0:
        raise ValueError(f"lr_schedule {schedule!r} needs the run's total number of updates")
    x = min(max(update, 0) / total_updates, 1.0)
    if schedule == "cosine":
        return final_frac + (1.0 - final_frac) * 0.5 * (1.0 + math.cos(math.pi * x))
    if schedule == "linear":
        return 1.0 - (1.0 - final_frac) * x
    raise ValueError(f"unknown lr_schedule {schedule!r}")


class GRPOTrainer:
    """Owns the controller being trained, its optimizer and the frozen reference policy (for KL).

    `total_updates` (the run's `system.total_updates`) sets the span of a decaying `grpo.lr_schedule`.
    """

    def __init__(self, controller: TwoStageController, grpo_cfg: Any, seed: int = 0, total_updates: int = 0):
        self.controller = controller
        self.cfg = grpo_cfg
        self.total_updates = int(total_updates)
        lr_factor(grpo_cfg.lr_schedule, 0, self.total_updates, grpo_cfg.lr_final_frac)   # fail early
        self.reference = copy.deepcopy(controller).eval() if grpo_cfg.kl_coef > 0 else None
        if self.reference is not None:
            for prm in self.reference.parameters():
                prm.requires_grad_(False)
        params = [p for p in controller.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=grpo_cfg.lr, weight_decay=grpo_cfg.weight_decay)
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0
        self.policy_version = 0

    # ------------------------------------------------------------------------------------------
    def update(self, rows: Sequence[dict]) -> dict[str, float]:
        """One GRPO update on the rows of complete groups. Mutates the rows' learner-owned fields."""
        if not rows:
            raise ValueError("update() needs at least one row")
        cfg = self.cfg
        group_index = {g: i for i, g in enumerate(dict.fromkeys(r["group_id"] for r in rows))}
        group_ids = torch.tensor([group_index[r["group_id"]] for r in rows], dtype=torch.long)
        rewards = torch.tensor([r["reward"] for r in rows], dtype=torch.float64)
        advantages = grpo.group_advantages(rewards, group_ids, scale_by_std=cfg.scale_by_std, eps=cfg.adv_eps)
        keep, zero_var_groups = grpo.filter_zero_variance_groups(rewards, group_ids)
        for r, a in zip(rows, advantages.tolist()):
            r["advantage"] = a
            r["step"] = self.step

        stats: dict[str, float] = {
            "num_rollouts": float(len(rows)), "num_groups": float(len(group_index)),
            "zero_variance_groups": float(zero_var_groups),
            "reward_mean": float(rewards.mean()), "accuracy_mean": float(np.mean([r["accuracy"] for r in rows])),
            "attainment": float(np.mean([bool(r["within_budget"]) for r in rows])),
            "latency_ms_mean": float(np.mean([r["latency_ms"] for r in rows])),
            **{f"adv_{k}": v for k, v in grpo.advantage_stats(advantages).items()},
        }
        with torch.no_grad():   # importance ratio against the behaviour policy before this update moves
            logp_now = self.controller.log_prob(collate_features(rows))[0]
        ratio = torch.exp(logp_now - torch.tensor([r["behavior_logp"] for r in rows], dtype=torch.float32))
        for r, v in zip(rows, ratio.tolist()):
            r["ratio_first"] = v
        stats["ratio_first_max_abs_dev"] = float((ratio - 1).abs().max())
        lr = cfg.lr * lr_factor(cfg.lr_schedule, self.step, self.total_updates, cfg.lr_final_frac)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        stats["lr"] = lr
        idx = torch.nonzero(keep).flatten()
        if idx.numel() > 0:
            stats.update(self._optimise([rows[i] for i in idx.tolist()], advantages[idx].to(torch.float32)))
        self.step += 1
        self.policy_version += 1
        stats["step"] = float(self.step)
        stats["policy_version"] = float(self.policy_version)
        return stats

    def _optimise(self, rows: list[dict], advantages: torch.Tensor) -> dict[str, float]:
        cfg = self.cfg
        batch = collate_features(rows)
        logp_old = torch.tensor([r["behavior_logp"] for r in rows], dtype=torch.float32)
        logp_ref = None
        if self.reference is not None:
            with torch.no_grad():
                logp_ref = self.reference.log_prob(batch)[0]
        n = len(rows)
        num_mb = min(cfg.minibatches, n)
        acc: dict[str, list[float]] = {}
        self.controller.train()
        for _epoch in range(cfg.epochs):
            for mb in grpo.minibatch_indices(n, num_mb, self.generator):
                sub = {k: v[mb] for k, v in batch.items()}
                logp_new, _per_head, ent = self.controller.log_prob(sub)
                entropy = sum(ent.values())
                loss, st = grpo.grpo_loss(logp_new, logp_old[mb], advantages[mb], clip_low=cfg.clip_low,
                                          clip_high=cfg.clip_high, kl_coef=cfg.kl_coef,
                                          logp_ref=None if logp_ref is None else logp_ref[mb],
                                          entropy=entropy, entropy_coef=cfg.entropy_coef)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                params = [p for p in self.controller.parameters() if p.grad is not None]
                if cfg.grad_clip > 0:
                    st["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
                self.optimizer.step()
                for h in HEADS:
                    st[f"entropy_{h}"] = float(ent[h].detach().mean())
                for k, v in st.items():
                    acc.setdefault(k, []).append(float(v))
        self.controller.eval()
        return {k: float(np.mean(v)) for k, v in acc.items()}

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs (tensors only in the torch parts; safe to save with torch.save)."""
        return {
            "controller": self.controller.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "reference": None if self.reference is None else self.reference.state_dict(),
            "step": self.step,
            "policy_version": self.policy_version,
            "rng": {"torch_generator": self.generator.get_state(), "torch": torch.get_rng_state(),
                    "numpy": np.random.get_state(), "python": random.getstate()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state["controller"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.reference is not None and state.get("reference") is not None:
            self.reference.load_state_dict(state["reference"])
        self.step = int(state["step"])
        self.policy_version = int(state["policy_version"])
        self.generator.set_state(state["rng"]["torch_generator"])
