"""Pure GRPO math for the budget controller: advantages, clipped surrogate, KL, entropy, masking.

Torch only (no Ray, no model, no config), so every function here is unit-tested on CPU in
``tests/test_grpo.py``. The learner feeds it one scalar log-prob per rollout: the sum of the four
categorical log-probs (tier, insertion position p, top_k, num_blocks), masks included, exactly as sampled.

Where we follow or deviate from DeepSeekMath's GRPO (arXiv 2402.03300):

1. Advantage ``(r - mean_g) / (std_g + eps)`` per group, with ``std_g`` the *unbiased* (Bessel-corrected)
   group std, as ``torch.std`` in TRL and verl. ``scale_by_std=False`` gives Dr. GRPO's mean-only baseline,
   which removes the question-difficulty bias of std normalisation.
2. Groups whose rewards are all equal (size-1 groups included) get an advantage of *exactly* 0. Without
   this, float round-off in the group mean (e.g. three rewards of 0.1) leaves a residual ~1e-8 that the
   division by ``std + eps`` (std ~0) blows up to O(0.01). ``filter_zero_variance_groups`` drops such
   groups and counts them (DAPO's dynamic-sampling filter, TRL's ``frac_reward_zero_std``).
3. One rollout is one "sequence" of four fixed decisions, so there is no length normalisation to choose:
   the loss is a plain mean over rollouts (DAPO/Dr. GRPO length biases do not arise).
4. PPO ratio with separate low/high clip (DAPO's Clip-Higher: 0.2 / 0.28). No dual clip.
5. Optional KL to a reference policy in the loss (not the reward), with the k3 estimator; default off
   (``kl_coef=0``), as TRL, Dr. GRPO and DAPO.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "group_advantages",
    "filter_zero_variance_groups",
    "policy_loss",
    "kl_k3",
    "grpo_loss",
    "advantage_stats",
    "masked_log_softmax",
    "categorical_entropy",
    "minibatch_indices",
]


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


def _check_1d(**tensors: Tensor | None) -> int:
    """Check that every non-None tensor is 1-D and that they all have the same length; return it."""
    n: int | None = None
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D [N], got shape {tuple(t.shape)}")
        if n is None:
            n = t.shape[0]
        elif t.shape[0] != n:
            raise ValueError(f"{name} has length {t.shape[0]}, expected {n}")
    return 0 if n is None else n


def _group_index(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Map arbitrary integer group ids to dense indices.

    Returns:
        inverse: [N] long, dense group index in [0, num_groups) of each rollout.
        counts: [num_groups] long, size of each group.
    """
    _check_1d(rewards=rewards, group_ids=group_ids)
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool or group_ids.is_complex():
        raise TypeError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    if not rewards.dtype.is_floating_point:
        raise TypeError(f"rewards must be a floating tensor, got {rewards.dtype}")
    if not bool(torch.isfinite(rewards).all()):
        # A failed rollout must be dropped upstream, never reach the learner as NaN/inf (DESIGN.md 5).
        raise ValueError("rewards contain NaN or inf")
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    return inverse, counts


def _group_is_constant(r: Tensor, inverse: Tensor, num_groups: int, tol: float) -> Tensor:
    """[num_groups] bool: True where max - min of the group's rewards is <= tol."""
    gmax = torch.full((num_groups,), -math.inf, dtype=r.dtype, device=r.device)
    gmin = torch.full((num_groups,), math.inf, dtype=r.dtype, device=r.device)
    gmax = gmax.scatter_reduce(0, inverse, r, reduce="amax", include_self=True)
    gmin = gmin.scatter_reduce(0, inverse, r, reduce="amin", include_self=True)
    return (gmax - gmin) <= tol


def _masked_mean(x: Tensor, weight: Tensor | None) -> Tensor:
    """Mean of x [N] over entries where weight [N] (float 0/1) is 1; 0 (with graph) if none are or N=0."""
    if weight is None:
        return x.mean() if x.numel() > 0 else x.sum()
    return torch.where(weight > 0, x, torch.zeros_like(x)).sum() / weight.sum().clamp_min(1.0)


def _as_weight(mask: Tensor | None, n: int, like: Tensor) -> Tensor | None:
    if mask is None:
        return None
    if mask.shape != (n,):
        raise ValueError(f"mask must have shape [{n}], got {tuple(mask.shape)}")
    return mask.to(device=like.device, dtype=like.dtype)


# ---------------------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------------------


def group_advantages(
    rewards: Tensor, group_ids: Tensor, *, scale_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """Group-relative advantages (GRPO), vectorised over groups of any size.

    ``A_i = (r_i - mean_g) / (std_g + eps)`` where g is the group of rollout i and ``std_g`` is the
    unbiased (Bessel-corrected, ``torch.std`` default) std of the group, as in TRL and verl. With
    ``scale_by_std=False``: ``A_i = r_i - mean_g`` (Dr. GRPO). Groups whose rewards are all equal, size-1
    groups included, get exactly 0. Statistics are computed in float64; the result has ``rewards.dtype``.

    Args:
        rewards: [N] float, scalar reward per rollout. Must be finite.
        group_ids: [N] integer, rollouts of the same (sample, budget) share an id; ids need not be
            contiguous or sorted.
        scale_by_std: False gives the mean-only baseline (Dr. GRPO).
        eps: added to the group std before dividing.

    Returns:
        [N] advantages (no grad), summing to 0 within each group.

    Raises:
        ValueError: on shape mismatch or non-finite rewards.
        TypeError: if group_ids is not an integer tensor or rewards not floating.
    """
    inverse, counts = _group_index(rewards, group_ids)
    num_groups = counts.numel()
    r = rewards.detach().to(torch.float64)
    zeros = torch.zeros(num_groups, dtype=torch.float64, device=r.device)

    mean = zeros.index_add(0, inverse, r) / counts.to(torch.float64)
    centered = r - mean[inverse]
    if scale_by_std:
        sq = zeros.index_add(0, inverse, centered * centered)
        var = sq / (counts - 1).clamp_min(1).to(torch.float64)  # unbiased; size-1 groups zeroed below
        adv = centered / (var.sqrt()[inverse] + eps)
    else:
        adv = centered
    constant = _group_is_constant(r, inverse, num_groups, tol=0.0)[inverse]
    adv = adv.masked_fill(constant, 0.0)
    return adv.to(rewards.dtype)


def filter_zero_variance_groups(rewards: Tensor, group_ids: Tensor, tol: float = 1e-8) -> tuple[Tensor, int]:
    """Find groups whose rewards are all (nearly) equal: they carry no GRPO gradient.

    A group is zero-variance when ``max(r) - min(r) <= tol`` over its rollouts; size-1 groups always are.

    Args:
        rewards: [N] float, scalar reward per rollout.
        group_ids: [N] integer group id per rollout.
        tol: absolute tolerance on the reward range of a group.

    Returns:
        keep_mask: [N] bool, True for rollouts of groups with reward variance.
        num_dropped_groups: number of zero-variance groups (log it; e.g. divide by the number of
            groups for TRL's ``frac_reward_zero_std``).
    """
    inverse, counts = _group_index(rewards, group_ids)
    constant = _group_is_constant(rewards.detach().to(torch.float64), inverse, counts.numel(), tol=tol)
    return ~constant[inverse], int(constant.sum().item())


def advantage_stats(advantages: Tensor) -> dict[str, float]:
    """Summary statistics of an advantage vector, for logging.

    Args:
        advantages: [N] float.

    Returns:
        dict with ``mean``, ``std`` (population, so N=1 gives 0), ``min``, ``max`` and ``frac_zero``
        (fraction of entries exactly 0, i.e. from zero-variance groups). All NaN when N=0.
    """
    _check_1d(advantages=advantages)
    a = advantages.detach().to(torch.float64)
    if a.numel() == 0:
        nan = float("nan")
        return {"mean": nan, "std": nan, "min": nan, "max": nan, "frac_zero": nan}
    return {
        "mean": a.mean().item(),
        "std": a.std(correction=0).item(),
        "min": a.min().item(),
        "max": a.max().item(),
        "frac_zero": (a == 0).double().mean().item(),
    }


# ---------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------


def kl_k3(logp_new: Tensor, logp_ref: Tensor) -> Tensor:
    """Per-rollout k3 estimator of KL(pi_theta || pi_ref) (Schulman; DeepSeekMath's GRPO objective).

    ``exp(ref - new) - (ref - new) - 1``, computed as ``expm1(d) - d`` for accuracy near 0 and clamped at
    0 so that round-off never makes it negative. Unbiased when the actions were sampled from pi_theta; in
    GRPO they come from pi_old, which is close.

    Args:
        logp_new: [N] log pi_theta(a), with grad.
        logp_ref: [N] log pi_ref(a) of the same actions; detached here.

    Returns:
        [N] non-negative KL estimates.
    """
    _check_1d(logp_new=logp_new, logp_ref=logp_ref)
    d = logp_ref.detach() - logp_new
    return (torch.expm1(d) - d).clamp_min(0.0)


def policy_loss(
    logp_new: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate with separate low/high clip (DAPO's Clip-Higher).

    ``ratio = exp(logp_new - logp_old)``;
    ``loss = -mean(min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A))``.
    The clipped term is active (the sample's gradient is zero) when ``A > 0 and ratio > 1 + clip_high``
    or ``A < 0 and ratio < 1 - clip_low``.

    Args:
        logp_new: [N] log-prob of each rollout's actions under the current policy, with grad.
        logp_old: [N] behaviour log-prob recorded by the worker; detached here.
        advantages: [N] per-rollout advantages; detached here.
        clip_low: ratio lower bound is ``1 - clip_low``.
        clip_high: ratio upper bound is ``1 + clip_high``.
        mask: optional [N] bool; only True entries enter the loss and the stats.

    Returns:
        loss: scalar tensor (0 with graph if the mask selects nothing).
        stats: python floats ``clip_fraction``, ``clip_fraction_low``, ``clip_fraction_high``,
            ``ratio_mean``, ``ratio_min``, ``ratio_max`` and ``approx_kl`` (k3 estimate of
            KL(pi_old || pi_theta): mean((ratio - 1) - log ratio)); all NaN if the mask selects nothing.
    """
    n = _check_1d(logp_new=logp_new, logp_old=logp_old, advantages=advantages)
    if not (0.0 <= clip_low < 1.0) or clip_high < 0.0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    weight = _as_weight(mask, n, logp_new)
    adv = advantages.detach().to(logp_new.dtype)
    log_ratio = logp_new - logp_old.detach()
    ratio = torch.exp(log_ratio)
    surr_unclipped = ratio * adv
    surr_clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    loss = -_masked_mean(torch.minimum(surr_unclipped, surr_clipped), weight)

    with torch.no_grad():
        r = ratio.detach()
        high = (adv > 0) & (r > 1.0 + clip_high)
        low = (adv < 0) & (r < 1.0 - clip_low)
        sel = torch.ones(n, dtype=torch.bool, device=r.device) if mask is None else mask.to(r.device).bool()
        if bool(sel.any()):
            stats = {
                "clip_fraction": (high | low)[sel].double().mean().item(),
                "clip_fraction_low": low[sel].double().mean().item(),
                "clip_fraction_high": high[sel].double().mean().item(),
                "ratio_mean": r[sel].mean().item(),
                "ratio_min": r[sel].min().item(),
                "ratio_max": r[sel].max().item(),
                "approx_kl": kl_k3(logp_old.detach(), logp_new.detach())[sel].mean().item(),
            }
        else:
            keys = ("clip_fraction", "clip_fraction_low", "clip_fraction_high", "ratio_mean", "ratio_min",
                    "ratio_max", "approx_kl")
            stats = {k: float("nan") for k in keys}
    return loss, stats


def grpo_loss(
    logp_new: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    kl_coef: float = 0.0,
    logp_ref: Tensor | None = None,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Full GRPO loss: clipped surrogate + kl_coef * k3 KL to a reference - entropy_coef * entropy.

    All terms are means over the (masked) rollouts.

    Args:
        logp_new: [N] current log-prob of each rollout (sum over the four heads), with grad.
        logp_old: [N] behaviour log-prob recorded by the worker.
        advantages: [N] per-rollout advantages.
        clip_low: ratio lower bound is ``1 - clip_low``.
        clip_high: ratio upper bound is ``1 + clip_high``.
        kl_coef: weight of the KL(pi_theta || pi_ref) term; 0 disables it.
        logp_ref: [N] reference-policy log-prob; required when ``kl_coef > 0``. If given with
            ``kl_coef == 0`` the KL is still logged.
        entropy: [N] policy entropy per rollout, summed over heads, with grad; required when
            ``entropy_coef != 0``.
        entropy_coef: weight of the entropy bonus (subtracted from the loss).
        mask: optional [N] bool selecting the rollouts that enter the loss.

    Returns:
        loss: scalar tensor.
        stats: ``policy_loss`` stats plus ``pg_loss`` and ``loss``; ``kl_ref`` when a reference is given;
            ``entropy`` when entropy is given.
    """
    n = _check_1d(
        logp_new=logp_new, logp_old=logp_old, advantages=advantages, logp_ref=logp_ref, entropy=entropy
    )
    if kl_coef < 0.0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0.0 and logp_ref is None:
        raise ValueError("kl_coef > 0 needs logp_ref")
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs entropy")

    pg_loss, stats = policy_loss(
        logp_new, logp_old, advantages, clip_low=clip_low, clip_high=clip_high, mask=mask
    )
    weight = _as_weight(mask, n, logp_new)
    loss = pg_loss
    stats["pg_loss"] = pg_loss.item()
    if logp_ref is not None:
        kl = _masked_mean(kl_k3(logp_new, logp_ref), weight)
        if kl_coef > 0.0:
            loss = loss + kl_coef * kl
        stats["kl_ref"] = kl.item()
    if entropy is not None:
        ent = _masked_mean(entropy, weight)
        if entropy_coef != 0.0:
            loss = loss - entropy_coef * ent
        stats["entropy"] = ent.item()
    stats["loss"] = loss.item()
    return loss, stats


# ---------------------------------------------------------------------------------------------------------
# Masked categoricals
# ---------------------------------------------------------------------------------------------------------


def masked_log_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """Log-softmax over the valid options only.

    Args:
        logits: [N, C] float.
        mask: [N, C] bool (or broadcastable to it), True = option allowed.

    Returns:
        [N, C] log-probs: -inf for masked options, exactly 0 for the only valid option of a row.
        Gradients w.r.t. logits are finite (0 at masked options).

    Raises:
        ValueError: if some row has no valid option.
    """
    if logits.dim() < 1:
        raise ValueError("logits must have a class dimension")
    mask = torch.broadcast_to(mask.to(device=logits.device, dtype=torch.bool), logits.shape)
    if not bool(mask.any(dim=-1).all()):
        raise ValueError("masked_log_softmax: a row has no valid option")
    return torch.log_softmax(logits.masked_fill(~mask, -math.inf), dim=-1)


def categorical_entropy(logits: Tensor, mask: Tensor) -> Tensor:
    """Entropy of a masked categorical, NaN-free in value and gradient.

    Masked options (whatever their logits, -inf included) contribute 0; a row with a single valid option
    has entropy 0.

    Args:
        logits: [N, C] float.
        mask: [N, C] bool (or broadcastable), True = option allowed.

    Returns:
        [N] entropy in nats.
    """
    mask = torch.broadcast_to(mask.to(device=logits.device, dtype=torch.bool), logits.shape)
    logp = masked_log_softmax(logits, mask)
    # Replace -inf before multiplying: 0 * -inf is NaN, and its backward would be NaN too.
    logp_safe = logp.masked_fill(~mask, 0.0)
    return -(logp_safe.exp() * logp_safe).masked_fill(~mask, 0.0).sum(dim=-1)


# ---------------------------------------------------------------------------------------------------------
# Minibatching
# ---------------------------------------------------------------------------------------------------------


def minibatch_indices(n: int, num_minibatches: int, generator: torch.Generator | None = None) -> list[Tensor]:
    """Shuffle ``range(n)`` and split it into ``num_minibatches`` parts whose sizes differ by at most 1.

    Args:
        n: number of rollouts, >= 1.
        num_minibatches: number of parts, 1 <= num_minibatches <= n (no part is empty).
        generator: torch.Generator for a reproducible shuffle (CPU).

    Returns:
        list of ``num_minibatches`` 1-D LongTensors; together they hold every index exactly once.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 1 <= num_minibatches <= n:
        raise ValueError(f"num_minibatches must be in [1, n={n}], got {num_minibatches}")
    perm = torch.randperm(n, generator=generator)
    return list(torch.tensor_split(perm, num_minibatches))
