"""MemFT objectives on hand-made tensors (docs/method.md §3)."""

import math

import pytest
import torch

from memcli.training.objectives import (
    LN2,
    Curriculum,
    SlidingConfig,
    SlidingState,
    hard_tokens,
    ot_loss,
    ot_weights,
    sliding_loss,
    sliding_weights,
    weighted_mean,
)


def t(*values):
    return torch.tensor([values], dtype=torch.float32)


def test_ot_mask_exactly_at_ln2():
    ln2 = torch.tensor(LN2, dtype=torch.float32)
    below, above = torch.nextafter(ln2, torch.tensor(0.0)), torch.nextafter(ln2, torch.tensor(9.0))
    ce = torch.stack([below, ln2, above]).unsqueeze(0)
    mask = torch.ones_like(ce, dtype=torch.bool)
    # p > 0.5 is learned; p = 0.5 exactly (CE = ln 2) is not yet certified, so it keeps its weight.
    assert ot_weights(ce, mask).tolist() == [[0.0, 1.0, 1.0]]


def test_ot_loss_is_mean_over_hard_tokens_only():
    ce = t(0.1, 2.0, 4.0, 9.0)
    mask = torch.tensor([[True, True, True, False]])
    loss, n_hard = ot_loss(ce, mask)
    assert n_hard == 2
    assert loss.item() == pytest.approx((2.0 + 4.0) / 2, rel=1e-6)


def test_ot_no_hard_tokens_fallback_and_skip():
    ce = t(0.1, 0.3, 0.5)
    mask = torch.tensor([[True, True, False]])
    loss, n_hard = ot_loss(ce, mask, "fallback")
    assert n_hard == 0 and loss.item() == pytest.approx(0.2, rel=1e-6)  # plain mean over the mask
    assert ot_loss(ce, mask, "skip") == (None, 0)


def test_weights_carry_no_gradient():
    ce = t(1.0, 2.0).requires_grad_()
    mask = torch.ones_like(ce, dtype=torch.bool)
    loss, _ = ot_loss(ce, mask)
    loss.backward()
    assert ce.grad[0].tolist() == pytest.approx([0.5, 0.5], rel=1e-6)  # d/dce of the mean, weights constant


def test_sw_phi_anchor_window_and_floor():
    n = 200
    ce = torch.full((n,), 5.0)
    correct = torch.ones(n, dtype=torch.bool)
    correct[30] = False
    correct[90] = False  # only the first wrong position anchors
    w = sliding_weights(ce, correct, SlidingState())
    w0 = torch.sigmoid(torch.tensor(10 * (5.0 - LN2)))
    assert w[:30] == pytest.approx(torch.full((30,), float(w0)))  # before the anchor: phi = 1
    assert w[30].item() == pytest.approx(float(w0))  # at the anchor: exp(0)
    assert w[55].item() == pytest.approx(float(w0) * math.exp(-25 / 20), rel=1e-5)
    assert w[79].item() == pytest.approx(float(w0) * math.exp(-49 / 20), rel=1e-5)  # last position in W = 50
    assert w[80].item() == pytest.approx(float(w0) * 0.01, rel=1e-5)  # beyond: the floor
    assert w[199].item() == pytest.approx(float(w0) * 0.01, rel=1e-5)


def test_sw_soft_base_weight():
    ce = torch.tensor([LN2, LN2 + 0.1, 0.0])
    w = sliding_weights(ce, torch.tensor([False, True, True]), SlidingState())
    assert w[0].item() == pytest.approx(0.5)
    assert w[1].item() == pytest.approx(1 / (1 + math.exp(-1.0)) * math.exp(-1 / 20), rel=1e-5)


def test_sw_all_correct_means_phi_one():
    ce = torch.tensor([0.1, 3.0])
    w = sliding_weights(ce, torch.ones(2, dtype=torch.bool), SlidingState())
    assert w.tolist() == pytest.approx(torch.sigmoid(10 * (ce - LN2)).tolist())


def test_sw_patience_growth_cap_and_reset():
    s = SlidingState()
    # Same anchor, as the reference code counts: the first visit sets it (0 repeats), each further step adds a
    # repeat, and the window grows by 0.5 from the 4th step on (3 repeats = patience), up to 4.0.
    assert [s.update(7) for _ in range(11)] == [1.0, 1.0, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.0, 4.0]
    assert s.update(8) == 1.0  # it moved: reset
    assert [s.update(8) for _ in range(3)] == [1.0, 1.0, 1.5]  # 4th consecutive step at 8


def test_sw_anchor_5555_expands_on_the_fourth_step_only():
    s = SlidingState()
    assert [s.update(5) for _ in range(4)] == [1.0, 1.0, 1.0, 1.5]
    assert (s.anchor, s.repeats) == (5, 3)


def test_sw_clean_step_resets_patience_expansion_and_anchor():
    ce = torch.full((4,), 5.0)
    wrong_at_1 = torch.tensor([True, False, True, True])
    clean = torch.ones(4, dtype=torch.bool)
    s = SlidingState()
    for _ in range(5):  # anchor 1 five times: expand 1, 1, 1, 1.5, 2.0
        sliding_weights(ce, wrong_at_1, s)
    assert (s.anchor, s.repeats, s.expand) == (1, 4, 2.0)
    sliding_weights(ce, clean, s)  # no wrong token
    assert (s.anchor, s.repeats, s.expand) == (None, 0, 1.0)
    # Back at the same anchor: a first visit again, so three more steps pass before it grows.
    expands = []
    for _ in range(4):
        sliding_weights(ce, wrong_at_1, s)
        expands.append(s.expand)
    assert expands == [1.0, 1.0, 1.0, 1.5]


def test_sw_clean_step_between_repeats_restarts_patience():
    ce = torch.full((4,), 5.0)
    wrong_at_2 = torch.tensor([True, True, False, True])
    clean = torch.ones(4, dtype=torch.bool)
    s = SlidingState()
    expands = []
    for correct in (wrong_at_2, wrong_at_2, wrong_at_2, clean, wrong_at_2, wrong_at_2, wrong_at_2, wrong_at_2):
        sliding_weights(ce, correct, s)
        expands.append(s.expand)
    # Without the reset the 4th step at anchor 2 (the 5th step) would have grown the window.
    assert expands == [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.5]


def test_sliding_state_reads_old_checkpoints():
    # Checkpoints before `repeats` counted the first visit as stay = 1.
    assert SlidingState.from_dict({"anchor": 9, "stay": 3, "expand": 1.5}) == SlidingState(9, 2, 1.5)
    assert SlidingState.from_dict({"anchor": None, "stay": 0, "expand": 1.0}) == SlidingState()
    assert SlidingState.from_dict({"anchor": 4, "repeats": 1, "expand": 1.0}) == SlidingState(4, 1, 1.0)


def test_sw_window_grows_in_weights():
    ce = torch.full((300,), 5.0)
    correct = torch.ones(300, dtype=torch.bool)
    correct[10] = False
    state = SlidingState()
    w0 = float(torch.sigmoid(torch.tensor(10 * (5.0 - LN2))))
    for _ in range(3):
        w = sliding_weights(ce, correct, state)
    # After 3 steps at the same anchor the window is still 50 tokens: 10 + 49 is inside, 10 + 50 is not.
    assert w[59].item() == pytest.approx(w0 * math.exp(-49 / 20), rel=1e-5)
    assert w[60].item() == pytest.approx(w0 * 0.01, rel=1e-5)
    w = sliding_weights(ce, correct, state)
    # The 4th step grows it to 75 tokens: position 10 + 74 is inside, 10 + 75 is not.
    assert w[84].item() == pytest.approx(w0 * math.exp(-74 / 20), rel=1e-5)
    assert w[85].item() == pytest.approx(w0 * 0.01, rel=1e-5)


def test_sliding_loss_weights_then_falls_back_to_mean_when_weights_vanish():
    ce = torch.tensor([[0.1, 0.3]])
    mask = torch.ones_like(ce, dtype=torch.bool)
    correct = torch.ones_like(mask)
    # Every argmax right: phi = 1, so the weights are the soft base weights sigmoid(10 (CE - ln 2)), by hand:
    w = [1 / (1 + math.exp(-10 * (c - LN2))) for c in (0.1, 0.3)]
    want = (w[0] * 0.1 + w[1] * 0.3) / (w[0] + w[1] + 1e-8)
    assert sliding_loss(ce, mask, correct, [SlidingState()], SlidingConfig()).item() == pytest.approx(want, rel=1e-5)
    # A sharpness that drives every weight under 1e-5: the plain mean (0.1 + 0.3) / 2, not 0.
    loss = sliding_loss(ce, mask, correct, [SlidingState()], SlidingConfig(sharpness=1000.0))
    assert loss.item() == pytest.approx(0.2, rel=1e-6)


def test_curriculum_exposure_schedule():
    c = Curriculum(n=10, seed=3)
    assert sorted(c.order) == list(range(10))
    assert c.order == Curriculum(n=10, seed=3).order  # fixed, seeded
    sizes = [len(c.exposed(e)) for e in (0, 19, 20, 39, 40, 60, 79, 80, 500)]
    assert sizes == [2, 2, 4, 4, 6, 8, 8, 10, 10]
    for e in (0, 20, 40, 60, 80):  # a growing prefix: earlier samples stay in, same order
        assert c.exposed(e) == c.order[: len(c.exposed(e))]


def test_curriculum_custom_boundaries_and_small_corpus():
    c = Curriculum(n=3, seed=0, boundaries=(1, 2))
    assert [len(c.exposed(e)) for e in (0, 1, 2)] == [1, 2, 3]


def test_weighted_mean_and_hard_tokens():
    ce = t(1.0, 3.0)
    assert weighted_mean(ce, torch.tensor([[1.0, 3.0]])).item() == pytest.approx(2.5, rel=1e-6)
    assert hard_tokens(t(0.1, 1.0), torch.tensor([[True, False]])).tolist() == [[False, False]]


def test_ot_training_threshold_and_floor_by_hand():
    # p = 0.95, 0.8, 0.6, 0.3 on answer tokens, and one padding position
    p = torch.tensor([[0.95, 0.8, 0.6, 0.3, 0.5]])
    ce = -torch.log(p)
    mask = torch.tensor([[True, True, True, True, False]])
    # the paper's threshold: only p <= 0.5 trains
    assert ot_weights(ce, mask).tolist() == [[0, 0, 0, 1, 0]]
    # train while p <= 0.9: the tokens at 0.8, 0.6 and 0.3
    assert ot_weights(ce, mask, threshold=0.9).tolist() == [[0, 1, 1, 1, 0]]
    # a floor of 0.1 on the tokens above it (never on padding)
    w = ot_weights(ce, mask, threshold=0.9, floor=0.1)
    assert torch.allclose(w, torch.tensor([[0.1, 1, 1, 1, 0]]))
    loss, hard = ot_loss(ce, mask, threshold=0.9, floor=0.1)
    expected = (0.1 * -math.log(0.95) - math.log(0.8) - math.log(0.6) - math.log(0.3)) / 3.1
    assert hard == 3 and loss.item() == pytest.approx(expected, rel=1e-6)
    # nothing under the threshold and a floor: the floor weights every answer token, no fallback needed
    high = -torch.log(torch.tensor([[0.95, 0.97]]))
    loss, hard = ot_loss(high, torch.ones(1, 2, dtype=torch.bool), no_hard="skip", threshold=0.9, floor=0.2)
    assert hard == 0 and loss.item() == pytest.approx((-math.log(0.95) - math.log(0.97)) / 2, rel=1e-6)
