"""The auto-k controller as pure functions: the goodput model, its inputs, calibration."""

import random

import numpy as np
import pytest

from lvspec_vllm.auto_k import (AcceptanceProfile, AutoK, Costs, StepCostModel, choose_k,
                                expected_tokens, goodput_table)


def test_expected_tokens():
    assert expected_tokens([1.0] * 8, 8) == 9
    assert expected_tokens([0.0] * 8, 8) == 1
    assert expected_tokens([0.5, 0.5], 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens([0.9] * 4, 0) == 1


def _brute(alpha, costs, batch, k_max):
    best = max(range(k_max + 1), key=lambda k: (
        batch * expected_tokens(alpha, k) / costs.step_time(batch, k), -k))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_choice_is_the_goodput_argmax(seed):
    rng = np.random.default_rng(seed)
    k_max = int(rng.integers(1, 12))
    alpha = rng.uniform(0, 1, k_max)
    costs = Costs(*rng.uniform(1e-4, 1e-2, 4) * rng.choice([0.01, 1, 100], 4))
    table = choose_k(alpha, costs, 64, k_max)
    for batch in (1, 2, 7, 16, 64):
        assert table[batch] == _brute(alpha, costs, batch, k_max)


def test_k_zero_when_drafting_cannot_pay():
    # The draft is almost never right. (k = 0 still pays one draft pass that keeps the draft's
    # KV cache in step, so k = 1 costs only its extra verified row.)
    alpha = [0.01] * 8
    costs = Costs(a=0.01, b=1e-3, c=0.005, d=1e-5)
    assert set(choose_k(alpha, costs, 32, 8)[1:]) == {0}


def test_a_deferred_k0_pass_makes_no_speculation_the_choice_when_the_draft_is_dear():
    # Drafts are accepted half the time and a draft forward costs as much as the target's whole
    # step. If k = 0 must still run that forward, verifying one draft is nearly free and k = 1
    # wins; when the drafter defers it (draft_catch_up), k = 0 costs what no speculation costs.
    alpha = [0.5] * 4
    eager = Costs(a=0.01, b=1e-3, c=0.03, d=1e-3)
    deferred = Costs(a=0.01, b=1e-3, c=0.03, d=1e-3, k0_pass=False)
    for batch in (1, 8, 32):
        assert deferred.step_time(batch, 0) == pytest.approx(0.01 + 1e-3 * batch)
        assert eager.step_time(batch, 0) == pytest.approx(deferred.step_time(batch, 0)
                                                          + 0.03 + 1e-3 * batch)
    assert set(choose_k(alpha, eager, 32, 4)[1:]) == {1}
    assert set(choose_k(alpha, deferred, 32, 4)[1:]) == {0}


@pytest.mark.parametrize("k0_pass", [True, False])
def test_the_fit_recovers_costs_with_and_without_the_k0_pass(k0_pass):
    true = Costs(a=0.02, b=3e-4, c=4e-3, d=2e-4, k0_pass=k0_pass)
    model = StepCostModel(min_samples=8, k0_pass=k0_pass)
    for batch in (1, 3, 8, 16):
        for k in (0, 1, 2, 4):
            model.add(batch, k, batch * (k + 1), float(true.step_time(batch, k)))
    fitted = model.fit()
    assert fitted.k0_pass == k0_pass
    for name in "abcd":
        assert getattr(fitted, name) == pytest.approx(getattr(true, name), rel=1e-6)


def test_long_drafts_when_verify_is_memory_bound_and_drafts_are_good():
    alpha = [0.95] * 8
    costs = Costs(a=0.03, b=1e-6, c=1e-4, d=1e-7)   # big fixed step cost, cheap draft
    assert set(choose_k(alpha, costs, 8, 8)[1:]) == {8}


def test_k_falls_as_the_batch_makes_verification_compute_bound():
    alpha = [0.7] * 8
    costs = Costs(a=0.02, b=2e-4, c=5e-4, d=1e-5)
    table = choose_k(alpha, costs, 256, 8)
    assert table[1] > table[256]
    assert all(x >= y for x, y in zip(table[1:], table[2:]))  # non-increasing in the batch


def test_acceptance_profile_learns_per_position_rates():
    rng = random.Random(0)
    prof = AcceptanceProfile(4, decay=1.0)
    true = [0.9, 0.6, 0.3, 0.5]
    for _ in range(3000):
        m = 0
        while m < 4 and rng.random() < true[m]:
            m += 1
        prof.update([4], [m])
    assert np.allclose(prof.alpha(), true, atol=0.05)


def test_cost_fit_recovers_the_costs_and_needs_varied_k():
    true = Costs(a=0.02, b=3e-4, c=4e-3, d=2e-4)
    rng = np.random.default_rng(1)
    model = StepCostModel(min_samples=8)
    for _ in range(200):
        model.add(4, 4, 20, 0.1)
    assert model.fit() is None  # one (batch, k): the four costs cannot be told apart
    model = StepCostModel(min_samples=8)
    for _ in range(300):
        b, k = int(rng.integers(1, 32)), int(rng.integers(0, 9))
        model.add(b, k, b * (k + 1), true.step_time(b, k) * rng.normal(1, 0.01))
    fit = model.fit()
    for name in "abcd":
        assert getattr(fit, name) == pytest.approx(getattr(true, name), rel=0.1)


@pytest.mark.parametrize("alpha,want_zero", [(0.9, False), (0.02, True)])
def test_closed_loop_calibrates_then_follows_the_model(alpha, want_zero):
    """A simulated engine: the controller only sees step times and accepted counts."""
    true = Costs(a=0.02, b=2e-4, c=3e-3, d=1e-4)
    rng = random.Random(2)
    auto = AutoK(k_max=8, max_batch=16)
    seen = set()
    for step in range(400):
        batch = rng.choice([1, 2, 4, 8, 16])
        k = auto.next_table()[batch]
        seen.add(k)
        accepted = []
        for _ in range(batch):
            m = 0
            while m < k and rng.random() < alpha:
                m += 1
            accepted.append(m)
        t = true.step_time(batch, k) * rng.uniform(0.98, 1.02)
        auto.observe(batch, k, batch * (k + 1), t, [k] * batch if k else [], accepted)
    assert {0, 8} <= seen                       # calibration visited both ends
    want = choose_k([alpha] * 8, true, 16, 8)
    got = auto.table
    goodput = goodput_table([alpha] * 8, true, 16, 8)
    # Under the true costs, the learnt choice is within 3 % of the best at every batch size.
    for b in range(1, 17):
        assert goodput[b, got[b]] >= 0.97 * goodput[b, want[b]], (b, got, want)
    if want_zero:
        assert got[16] == 0 and max(got[1:]) <= 1
    else:
        assert min(got[1:]) >= 4



def test_the_step_that_catches_the_draft_up_stays_out_of_the_fit():
    # With deferred k = 0 passes, the first drafting step after k = 0 also processes the
    # deferred tokens: its time is not what a step at its k costs.
    auto = AutoK(k_max=4, max_batch=8, k0_pass=False)
    for k, seconds in ((2, 0.02), (0, 0.01), (0, 0.01), (1, 0.09), (1, 0.02), (0, 0.01)):
        auto.observe(4, k, 4 * (k + 1), seconds, [], [])
    assert [(k, t) for _, k, _, t in auto.costs.samples] == [
        (2, 0.02), (0, 0.01), (0, 0.01), (1, 0.02), (0, 0.01)]
    eager = AutoK(k_max=4, max_batch=8)  # vLLM's k = 0 pass: every step is a sample
    for k in (0, 1):
        eager.observe(4, k, 4 * (k + 1), 0.01, [], [])
    assert len(eager.costs.samples) == 2


@pytest.mark.parametrize("k0_pass, explored", [(True, 1), (False, 2)])
def test_exploration_lasts_two_steps_with_deferred_passes(k0_pass, explored):
    auto = AutoK(k_max=4, max_batch=8, k0_pass=k0_pass, calibration_steps=0,
                 explore_every=16)
    # verifying a row costs ten times the fixed part: drafting cannot pay at any k
    costs = Costs(a=1e-3, b=1e-2, c=0.0, d=0.0, k0_pass=k0_pass)
    for batch in (1, 2, 4, 8, 16, 32):  # more samples than the fit's minimum
        for k in (0, 1, 2, 4):
            auto.costs.add(batch, k, batch * (k + 1), float(costs.step_time(batch, k)))
    nudged = []
    for step in range(1, 40):
        auto.steps = step
        if auto.next_table()[4] != 0:
            nudged.append(step)
    assert auto.table[1:] == [0] * 8
    # nudged down from 0 is still 0, so only the upward explorations show: 16 (and 17)
    assert nudged == [16, 17][:explored]
