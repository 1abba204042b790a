"""Tests for learner/grpo.py: hand-computed values, slow reference loops, invariances, gradients, bandit."""

from __future__ import annotations

import math
import statistics
import time

import pytest
import torch

from learner.grpo import (
    advantage_stats,
    categorical_entropy,
    filter_zero_variance_groups,
    grpo_loss,
    group_advantages,
    kl_k3,
    masked_log_softmax,
    minibatch_indices,
    policy_loss,
)

EPS = 1e-6


# ---------------------------------------------------------------------------------------------------------
# Slow reference implementations (plain Python loops)
# ---------------------------------------------------------------------------------------------------------


def ref_group_advantages(rewards: list[float], ids: list[int], scale_by_std: bool, eps: float) -> list[float]:
    out = [0.0] * len(rewards)
    for g in set(ids):
        idx = [i for i, x in enumerate(ids) if x == g]
        rs = [rewards[i] for i in idx]
        if len(rs) < 2 or max(rs) == min(rs):
            continue
        mean = sum(rs) / len(rs)
        std = statistics.stdev(rs)  # unbiased
        for i in idx:
            out[i] = (rewards[i] - mean) / (std + eps) if scale_by_std else rewards[i] - mean
    return out


def ref_policy_loss(new: list[float], old: list[float], adv: list[float], cl: float, ch: float) -> float:
    total = 0.0
    for n, o, a in zip(new, old, adv):
        ratio = math.exp(n - o)
        total += min(ratio * a, min(max(ratio, 1 - cl), 1 + ch) * a)
    return -total / len(new)


def ref_masked_log_softmax_row(logits: list[float], mask: list[bool]) -> list[float]:
    valid = [x for x, m in zip(logits, mask) if m]
    mx = max(valid)
    lse = mx + math.log(sum(math.exp(x - mx) for x in valid))
    return [x - lse if m else -math.inf for x, m in zip(logits, mask)]


def ref_entropy_row(logits: list[float], mask: list[bool]) -> float:
    logp = ref_masked_log_softmax_row(logits, mask)
    return -sum(math.exp(lp) * lp for lp, m in zip(logp, mask) if m)


# ---------------------------------------------------------------------------------------------------------
# group_advantages
# ---------------------------------------------------------------------------------------------------------


def test_group_advantages_hand_computed():
    # Non-contiguous, interleaved ids: group 7 = [1, 2, 3], group -3 = [5, 5] (constant),
    # group 42 = [7] (size 1), group 0 = [0, 1].
    rewards = torch.tensor([1.0, 5.0, 2.0, 7.0, 5.0, 3.0, 0.0, 1.0])
    ids = torch.tensor([7, -3, 7, 42, -3, 7, 0, 0])
    a = group_advantages(rewards, ids)
    s2 = math.sqrt(0.5)  # unbiased std of [0, 1]
    expected = [-1 / (1 + EPS), 0.0, 0.0, 0.0, 0.0, 1 / (1 + EPS), -0.5 / (s2 + EPS), 0.5 / (s2 + EPS)]
    torch.testing.assert_close(a, torch.tensor(expected), rtol=0, atol=1e-6)
    assert a.dtype == rewards.dtype

    a0 = group_advantages(rewards, ids, scale_by_std=False)
    torch.testing.assert_close(a0, torch.tensor([-1.0, 0, 0, 0, 0, 1.0, -0.5, 0.5]), rtol=0, atol=1e-7)


def test_group_advantages_constant_groups_exactly_zero():
    # 0.1 is not representable: a naive mean leaves ~1e-9 residuals that / (0 + eps) would turn into O(1e-3).
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.7], dtype=torch.float32)
    ids = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    for scale in (True, False):
        assert torch.equal(group_advantages(rewards, ids, scale_by_std=scale), torch.zeros(7))


def test_group_advantages_empty_and_errors():
    assert group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)
    with pytest.raises(ValueError):
        group_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError):
        group_advantages(torch.zeros(2), torch.zeros(2))


@pytest.mark.parametrize("scale_by_std", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_advantages_matches_reference_loop(scale_by_std, seed):
    g = torch.Generator().manual_seed(seed)
    n = 200
    ids = torch.randint(0, 37, (n,), generator=g) * 3 - 50  # arbitrary, uneven group sizes (some size 1)
    rewards = torch.randn(n, generator=g, dtype=torch.float64)
    # some discrete rewards too, so that some groups are constant
    rewards[::3] = torch.randint(0, 2, (len(rewards[::3]),), generator=g).double()
    got = group_advantages(rewards, ids, scale_by_std=scale_by_std)
    want = ref_group_advantages(rewards.tolist(), ids.tolist(), scale_by_std, EPS)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_advantages_invariances(scale_by_std):
    g = torch.Generator().manual_seed(3)
    ids = torch.arange(16).repeat_interleave(8)[torch.randperm(128, generator=g)]
    rewards = torch.rand(128, generator=g)
    a = group_advantages(rewards, ids, scale_by_std=scale_by_std)

    # shift invariance
    torch.testing.assert_close(group_advantages(rewards + 3.7, ids, scale_by_std=scale_by_std), a,
                               rtol=0, atol=1e-5)
    # zero sum within each group
    sums = torch.zeros(16).index_add(0, ids, a)
    torch.testing.assert_close(sums, torch.zeros(16), rtol=0, atol=1e-5)
    if scale_by_std:
        # scale invariance (up to eps)
        for c in (0.5, 10.0):
            torch.testing.assert_close(group_advantages(rewards * c, ids), a, rtol=1e-4, atol=1e-4)
        # unit unbiased std within each group
        for k in range(16):
            assert abs(a[ids == k].std().item() - 1.0) < 1e-4
    else:
        torch.testing.assert_close(group_advantages(rewards * 2.0, ids, scale_by_std=False), 2.0 * a)


# ---------------------------------------------------------------------------------------------------------
# filter_zero_variance_groups, advantage_stats, minibatch_indices
# ---------------------------------------------------------------------------------------------------------


def test_filter_zero_variance_groups_counts():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 2.0, 3.0, 3.0, 0.5, 0.2, 0.5])
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 4, 4, 4])
    keep, dropped = filter_zero_variance_groups(rewards, ids)
    assert dropped == 3  # group 0 (constant), group 2 (size 1), group 3 (constant)
    assert keep.tolist() == [False] * 3 + [True] * 2 + [False] * 3 + [True] * 3
    assert keep.dtype == torch.bool

    near = torch.tensor([1.0, 1.0 + 1e-10], dtype=torch.float64)
    assert filter_zero_variance_groups(near, torch.tensor([5, 5]))[1] == 1
    assert filter_zero_variance_groups(near, torch.tensor([5, 5]), tol=0.0)[1] == 0

    # consistent with the advantages: dropped rollouts are exactly those with advantage 0 here
    a = group_advantages(rewards, ids)
    assert torch.equal(a == 0, ~keep)


def test_advantage_stats():
    s = advantage_stats(torch.tensor([-1.0, 0.0, 0.0, 1.0]))
    assert s["mean"] == 0.0 and s["min"] == -1.0 and s["max"] == 1.0
    assert s["frac_zero"] == 0.5
    assert abs(s["std"] - math.sqrt(0.5)) < 1e-12
    assert all(math.isnan(v) for v in advantage_stats(torch.zeros(0)).values())


def test_minibatch_indices():
    for n, k in [(10, 3), (64, 4), (7, 7), (5, 1)]:
        parts = minibatch_indices(n, k, torch.Generator().manual_seed(0))
        assert len(parts) == k
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
        assert all(p.dtype == torch.long for p in parts)
        assert torch.equal(torch.cat(parts).sort().values, torch.arange(n))
    a = minibatch_indices(20, 3, torch.Generator().manual_seed(1))
    b = minibatch_indices(20, 3, torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(torch.cat(a), torch.arange(20))  # shuffled
    for n, k in [(0, 1), (3, 0), (3, 4)]:
        with pytest.raises(ValueError):
            minibatch_indices(n, k)


# ---------------------------------------------------------------------------------------------------------
# kl_k3, policy_loss, grpo_loss
# ---------------------------------------------------------------------------------------------------------


def test_kl_k3_hand_computed_and_nonnegative():
    ln2 = math.log(2.0)
    new = torch.tensor([0.0, ln2, -1.3], dtype=torch.float64)
    ref = torch.tensor([ln2, 0.0, -1.3], dtype=torch.float64)
    want = torch.tensor([1 - ln2, 0.5 + ln2 - 1, 0.0], dtype=torch.float64)
    torch.testing.assert_close(kl_k3(new, ref), want)

    g = torch.Generator().manual_seed(0)
    new = torch.randn(10_000, generator=g) * torch.logspace(-8, 1, 10_000)
    ref = new + torch.randn(10_000, generator=g) * torch.logspace(-8, 1, 10_000)
    k = kl_k3(new, ref)
    assert (k >= 0).all() and torch.isfinite(k).all()
    d = (ref - new).double()
    torch.testing.assert_close(k.double(), d.exp() - d - 1, rtol=1e-4, atol=1e-7)


def test_policy_loss_hand_computed():
    cl, ch = 0.2, 0.28
    ratio = torch.tensor([1.1, 1.5, 0.5, 1.5, 0.5, 1.0], dtype=torch.float64)
    adv = torch.tensor([2.0, 1.0, -1.0, -1.0, 1.0, 0.0], dtype=torch.float64)
    # inside | above 1+ch, A>0 (clipped) | below 1-cl, A<0 (clipped) | above, A<0 (not clipped)
    # | below, A>0 (not clipped) | A=0
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5, -0.7], dtype=torch.float64)
    new = (old + ratio.log()).requires_grad_(True)
    loss, stats = policy_loss(new, old, adv, clip_low=cl, clip_high=ch)
    objectives = [2.2, 1.28, -0.8, -1.5, 0.5, 0.0]
    assert loss.item() == pytest.approx(-sum(objectives) / 6, abs=1e-12)
    ref = ref_policy_loss(new.tolist(), old.tolist(), adv.tolist(), cl, ch)
    assert loss.item() == pytest.approx(ref, abs=1e-12)
    assert stats["clip_fraction"] == pytest.approx(2 / 6)
    assert stats["clip_fraction_high"] == pytest.approx(1 / 6)
    assert stats["clip_fraction_low"] == pytest.approx(1 / 6)
    assert stats["ratio_min"] == pytest.approx(0.5) and stats["ratio_max"] == pytest.approx(1.5)
    assert stats["ratio_mean"] == pytest.approx(6.1 / 6)
    r = ratio.tolist()
    assert stats["approx_kl"] == pytest.approx(sum(x - 1 - math.log(x) for x in r) / 6)

    loss.backward()
    # d(-obj_i / N) / d logp_i = -ratio_i * A_i / N when unclipped, 0 when the clipped term is active.
    want = torch.tensor([-1.1 * 2.0, 0.0, 0.0, 1.5, -0.5, 0.0], dtype=torch.float64) / 6
    torch.testing.assert_close(new.grad, want)


def test_policy_loss_mask():
    old = torch.zeros(4)
    new = torch.tensor([0.1, 0.2, 5.0, -0.3], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 3.0, 2.0])
    mask = torch.tensor([True, True, False, True])
    loss, stats = policy_loss(new, old, adv, mask=mask)
    sub_loss, sub_stats = policy_loss(new[mask], old[mask], adv[mask])
    assert loss.item() == pytest.approx(sub_loss.item())
    assert stats == pytest.approx(sub_stats)
    loss.backward()
    assert new.grad[2] == 0.0
    empty_loss, empty_stats = policy_loss(new, old, adv, mask=torch.zeros(4, dtype=torch.bool))
    assert empty_loss.item() == 0.0 and math.isnan(empty_stats["clip_fraction"])


def test_policy_loss_matches_reference_loop():
    g = torch.Generator().manual_seed(5)
    old = torch.randn(300, generator=g, dtype=torch.float64) - 2
    new = old + 0.4 * torch.randn(300, generator=g, dtype=torch.float64)
    adv = torch.randn(300, generator=g, dtype=torch.float64)
    for cl, ch in [(0.2, 0.28), (0.1, 0.1), (0.0, 0.5)]:
        loss, _ = policy_loss(new, old, adv, clip_low=cl, clip_high=ch)
        assert loss.item() == pytest.approx(ref_policy_loss(new.tolist(), old.tolist(), adv.tolist(), cl, ch),
                                            rel=1e-12, abs=1e-12)


def _linear_policy(seed: int, n: int = 32, d: int = 5, c: int = 4):
    """A tiny linear softmax policy: returns (W leaf [d, c], x [n, d], actions [n], logp_fn)."""
    g = torch.Generator().manual_seed(seed)
    w = (0.3 * torch.randn(d, c, generator=g, dtype=torch.float64)).requires_grad_(True)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    with torch.no_grad():
        actions = torch.multinomial(torch.softmax(x @ w, -1), 1, generator=g).squeeze(-1)

    def logp_fn(weights: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(x @ weights, dim=-1).gather(-1, actions[:, None]).squeeze(-1)

    return w, x, actions, logp_fn, g


def test_zero_lag_ratio_one_and_gradient_is_vanilla_policy_gradient():
    w, _, _, logp_fn, g = _linear_policy(0)
    logp = logp_fn(w)
    old = logp.detach().clone()
    adv = torch.randn(logp.shape[0], generator=g, dtype=torch.float64)
    loss, stats = policy_loss(logp, old, adv)
    assert stats["ratio_mean"] == 1.0 and stats["ratio_min"] == 1.0 and stats["ratio_max"] == 1.0
    assert stats["clip_fraction"] == 0.0 and stats["approx_kl"] == 0.0
    (grad,) = torch.autograd.grad(loss, w)
    (want,) = torch.autograd.grad(-(adv * logp_fn(w)).mean(), w)
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-14)

    # The k3 KL to a reference equal to the current policy is 0 with 0 gradient, whatever kl_coef.
    logp = logp_fn(w)
    total, tstats = grpo_loss(logp, old, adv, kl_coef=0.5, logp_ref=old)
    assert tstats["kl_ref"] == 0.0
    (grad_total,) = torch.autograd.grad(total, w)
    torch.testing.assert_close(grad_total, want, rtol=1e-12, atol=1e-14)


def test_float32_zero_lag_ratio_within_1e5():
    # float32 on both sides, log-probs recomputed by the same code: ratio is 1 within 1e-5 (DESIGN.md 5).
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(256, 4, 7, generator=g)  # four heads
    mask = torch.rand(256, 4, 7, generator=g) > 0.3
    mask[..., 0] = True
    logp_heads = masked_log_softmax(logits, mask)
    acts = torch.distributions.Categorical(logits=logp_heads).sample()
    old = logp_heads.gather(-1, acts[..., None]).squeeze(-1).sum(-1)  # [N], sum of four heads
    new = masked_log_softmax(logits.clone(), mask).gather(-1, acts[..., None]).squeeze(-1).sum(-1)
    _, stats = policy_loss(new, old, torch.ones(256))
    assert abs(stats["ratio_max"] - 1) < 1e-5 and abs(stats["ratio_min"] - 1) < 1e-5


def test_clipping_binds_in_second_epoch():
    cl, ch = 0.2, 0.28
    w, _, _, logp_fn, g = _linear_policy(1, n=64)
    old = logp_fn(w).detach()
    adv = torch.randn(64, generator=g, dtype=torch.float64)
    opt = torch.optim.SGD([w], lr=20.0)

    # epoch 1: at zero lag nothing is clipped; a big step moves many ratios out of the trust region
    loss, stats = policy_loss(logp_fn(w), old, adv, clip_low=cl, clip_high=ch)
    assert stats["clip_fraction"] == 0.0
    opt.zero_grad()
    loss.backward()
    opt.step()

    # epoch 2 on the same batch
    logp = logp_fn(w)
    logp.retain_grad()
    loss, stats = policy_loss(logp, old, adv, clip_low=cl, clip_high=ch)
    opt.zero_grad()
    loss.backward()
    ratio = (logp - old).exp().detach()
    clipped = ((adv > 0) & (ratio > 1 + ch)) | ((adv < 0) & (ratio < 1 - cl))
    assert stats["clip_fraction_high"] > 0 and stats["clip_fraction_low"] > 0
    assert stats["clip_fraction"] == pytest.approx(clipped.double().mean().item())
    assert torch.all(logp.grad[clipped] == 0)
    assert torch.all(logp.grad[~clipped & (adv != 0)] != 0)
    # the parameter gradient comes from the unclipped samples only
    (want,) = torch.autograd.grad(-((logp_fn(w) - old).exp() * adv)[~clipped].sum() / 64, w)
    torch.testing.assert_close(w.grad, want)


def test_grpo_loss_combination_and_errors():
    old = torch.tensor([-1.0, -2.0, -0.5])
    new = (old + torch.tensor([0.1, -0.1, 0.0])).requires_grad_(True)
    ref = torch.tensor([-1.2, -1.8, -0.6])
    adv = torch.tensor([1.0, -1.0, 0.5])
    ent = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    pg, _ = policy_loss(new, old, adv)
    kl = kl_k3(new, ref).mean()
    loss, stats = grpo_loss(new, old, adv, kl_coef=0.1, logp_ref=ref, entropy=ent, entropy_coef=0.01)
    assert loss.item() == pytest.approx(pg.item() + 0.1 * kl.item() - 0.01 * 2.0, abs=1e-6)
    assert stats["kl_ref"] == pytest.approx(kl.item()) and stats["entropy"] == pytest.approx(2.0)
    assert stats["pg_loss"] == pytest.approx(pg.item()) and stats["loss"] == pytest.approx(loss.item())
    loss.backward()
    torch.testing.assert_close(ent.grad, torch.full((3,), -0.01 / 3))

    loss0, stats0 = grpo_loss(new, old, adv)
    assert loss0.item() == pytest.approx(pg.item()) and "kl_ref" not in stats0 and "entropy" not in stats0
    with pytest.raises(ValueError):
        grpo_loss(new, old, adv, kl_coef=0.1)
    with pytest.raises(ValueError):
        grpo_loss(new, old, adv, entropy_coef=0.1)
    with pytest.raises(ValueError):
        grpo_loss(new, old, adv[:2])


# ---------------------------------------------------------------------------------------------------------
# masked_log_softmax, categorical_entropy
# ---------------------------------------------------------------------------------------------------------


def test_masked_log_softmax_and_entropy_hand_cases():
    ninf = -math.inf
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.5, ninf, 2.0], [5.0, 1.0, 100.0], [0.0, 0.0, 0.0]],
                          requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, False, True], [False, True, False], [True, True, True]])
    logp = masked_log_softmax(logits, mask)
    assert logp[2, 1].item() == 0.0  # single valid option
    assert torch.isinf(logp[~mask]).all() and (logp[~mask] < 0).all()
    torch.testing.assert_close(logp[3], torch.full((3,), -math.log(3.0)))
    ent = categorical_entropy(logits, mask)
    assert ent[2].item() == 0.0
    assert ent[3].item() == pytest.approx(math.log(3.0))
    for i in range(4):
        assert ent[i].item() == pytest.approx(ref_entropy_row(logits[i].tolist(), mask[i].tolist()), abs=1e-6)
        want = ref_masked_log_softmax_row(logits[i].tolist(), mask[i].tolist())
        for j in range(3):
            if mask[i, j]:
                assert logp[i, j].item() == pytest.approx(want[j], abs=1e-6)

    # gradients are finite and zero at masked options
    chosen = torch.tensor([1, 2, 1, 0])
    (ent.sum() + logp.gather(1, chosen[:, None]).sum()).backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[~mask] == 0).all()
    assert (logits.grad[2] == 0).all()  # a forced choice has no gradient

    with pytest.raises(ValueError):
        masked_log_softmax(torch.zeros(2, 3), torch.tensor([[True, False, False], [False, False, False]]))


def test_masked_entropy_matches_reference_loop():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(50, 6, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(50, 6, generator=g) > 0.5
    mask[torch.arange(50), torch.randint(0, 6, (50,), generator=g)] = True
    neg_inf_at = ~mask & (torch.rand(50, 6, generator=g) > 0.5)  # some masked options also have -inf logits
    logits = logits.masked_fill(neg_inf_at, -math.inf).requires_grad_(True)
    ent = categorical_entropy(logits, mask)
    want = torch.tensor([ref_entropy_row(logits[i].tolist(), mask[i].tolist()) for i in range(50)],
                        dtype=torch.float64)
    torch.testing.assert_close(ent, want)
    ent.sum().backward()
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------------------------------------------------
# Synthetic bandit: GRPO with these functions must find the known optimal arm
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_bandit_converges_to_optimal_arm(scale_by_std):
    t0 = time.perf_counter()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    # 2 contexts x 4 arms, Bernoulli rewards. In context 1 the best arm (3) is masked out, so the optimum
    # among the valid arms is arm 2.
    arm_means = torch.tensor([[0.2, 0.8, 0.4, 0.1], [0.6, 0.1, 0.9, 0.95]])
    valid = torch.tensor([[True, True, True, True], [True, True, True, False]])
    optimal = torch.tensor([1, 2])
    logits = torch.zeros(2, 4, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.05)
    group_size, groups_per_context, epochs, num_minibatches = 8, 4, 2, 2

    contexts = torch.arange(2).repeat_interleave(groups_per_context * group_size)  # [N]
    group_ids = torch.arange(2 * groups_per_context).repeat_interleave(group_size)  # [N]
    n = contexts.numel()
    dropped_total = 0
    for step in range(300):
        with torch.no_grad():  # rollouts: sample from pi_old, record behaviour log-probs
            logp_all = masked_log_softmax(logits[contexts], valid[contexts])
            actions = torch.multinomial(logp_all.exp(), 1, generator=g).squeeze(-1)
            logp_old = logp_all.gather(1, actions[:, None]).squeeze(-1)
            rewards = torch.bernoulli(arm_means[contexts, actions], generator=g)
        keep, dropped = filter_zero_variance_groups(rewards, group_ids)
        dropped_total += dropped
        adv = group_advantages(rewards, group_ids, scale_by_std=scale_by_std)
        for _ in range(epochs):
            for mb in minibatch_indices(n, num_minibatches, g):
                lp = masked_log_softmax(logits[contexts[mb]], valid[contexts[mb]])
                logp_new = lp.gather(1, actions[mb, None]).squeeze(-1)
                loss, _ = grpo_loss(
                    logp_new, logp_old[mb], adv[mb], clip_low=0.2, clip_high=0.28, mask=keep[mb]
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            probs = masked_log_softmax(logits, valid).exp()
        if (probs[torch.arange(2), optimal] > 0.95).all():
            break

    assert (probs[torch.arange(2), optimal] > 0.95).all(), probs
    print(f"bandit: >95% on the optimal arms after {step + 1} updates")
    assert probs[1, 3].item() == 0.0  # the masked arm is never chosen
    assert dropped_total > 0  # Bernoulli rewards do produce zero-variance groups
    assert time.perf_counter() - t0 < 5.0
