"""Train's optimiser settings do what they say: the learning-rate schedule by hand, LoRA+'s larger rate for B,
rsLoRA's scale, and the count of entries trained on that the settings study compares."""

import json
import math

import pytest
from helpers import DATA, assert_refused, run_cli

from memcli.training.config import TrainConfig, lr_factor


def test_schedules_by_hand():
    cfg = TrainConfig()
    assert [lr_factor(cfg, s, 4) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]  # today's linear decay
    warm = TrainConfig(warmup_steps=3, schedule="constant")
    assert [lr_factor(warm, s, 100) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cosine = TrainConfig(schedule="cosine", warmup_steps=2)
    assert lr_factor(cosine, 2, 12) == 1.0  # the first step after the warm-up
    assert lr_factor(cosine, 7, 12) == pytest.approx(0.5)  # half-way through the decay: cos(pi/2)
    assert lr_factor(cosine, 12, 12) == pytest.approx(0.0)
    linear = TrainConfig(warmup_steps=2)
    assert lr_factor(linear, 7, 12) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, pb8):
    from memcli.training.trainer import Trainer

    cfg = TrainConfig(corpus=str(pb8), model="tiny", rank=4, lr=0.01, lora_plus=16, rslora=True, batch_size=3,
                      max_steps=3, check_every=1000, gguf="off")
    t = Trainer(cfg, tmp_path_factory.mktemp("opt") / "run", log=lambda m: None)
    yield t
    t.close()


def test_lora_plus_trains_b_at_a_larger_rate(trainer):
    groups = trainer.optimizer.param_groups
    assert [g["lr"] for g in groups] == [0.01, pytest.approx(0.16)]
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert all(".lora_A." in names[id(p)] for p in groups[0]["params"])
    assert all(".lora_B." in names[id(p)] for p in groups[1]["params"])
    assert len(groups[0]["params"]) == len(groups[1]["params"]) > 0


def test_rslora_scales_by_alpha_over_sqrt_rank(trainer):
    from peft.tuners.lora import LoraLayer

    layers = [m for m in trainer.model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(m.scaling["default"] == pytest.approx(4 / math.sqrt(4)) for m in layers)


def test_entries_trained_on_count_a_partial_batch_as_it_is(trainer):
    # pb8 at batch 3: epochs of 3 + 3 + 2 entries; three steps see 8 entries
    assert [len(idx) for _, _, idx in trainer.batches()] == [3, 3, 2]
    trainer.step = 3
    assert trainer.examples_seen() == 8
    trainer.step = 2
    assert trainer.examples_seen() == 6


def test_bad_optimiser_settings_are_refused(tmp_path):
    corpus = DATA / "phonebook" / "llama" / "PB16.jsonl"
    for option, value in (("--schedule", "step"), ("--init", "pissa"), ("--lora-plus", "0"), ("--adam-beta2", "1"),
                          ("--adam-eps", "0"), ("--warmup-steps", "-1"), ("--tail-lr", "0"), ("--tail-lr", "1.5")):
        assert_refused(run_cli("train", corpus, "--out", tmp_path / "r", "--model", "tiny", option, value),
                       option)
    assert not (tmp_path / "r").exists()


def test_settings_study_compares_variants_on_the_same_corpus_and_seed(tmp_path, pb8):
    out = tmp_path / "study"
    args = ("bench", "settings", "--out", out, "--corpus", f"pb8={pb8}", "--model", "tiny", "--variant",
            "slow: lr=0.001 max_steps=30", "--variant", "fast: lr=0.05 batch_size=4 check_every=2 max_steps=30")
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["slow", "fast"]
    slow, fast = rows
    assert slow["steps"] == 30 and not slow["certified"]  # the budget ran out
    assert slow["examples"] == 30 * 8  # batch 16 holds all 8 entries
    assert fast["examples"] == fast["steps"] * 4
    assert fast["curve"] and all(step % 2 == 0 or step == fast["steps"] for step, _ in fast["curve"])
    assert (out / "settings.png").stat().st_size > 0 and not (out / "runs").exists()
    assert f"| pb8 | fast | {int(fast['certified'])}/1 |" in result.output
    again = run_cli(*args)  # a rerun trains nothing: every row is there
    assert again.exit_code == 0 and len((out / "results.jsonl").read_text().splitlines()) == 2
    for bad in ("x: seed=3", "x: lr=fast", "x: bogus=1", "a/b: lr=0.1"):
        assert_refused(run_cli("bench", "settings", "--out", tmp_path / "bad", "--corpus", f"pb8={pb8}",
                               "--variant", bad), "--variant")
    assert_refused(run_cli("bench", "settings", "--out", tmp_path / "bad", "--corpus", "pb8=/nonexistent"),
                   "--corpus")
    assert_refused(run_cli("bench", "settings", "--out", tmp_path / "bad", "--corpus", f"pb8={pb8}", "--corpus",
                           f"pb8={pb8}"), "two corpora are named 'pb8'")
    assert not (tmp_path / "bad").exists()


def test_the_tail_threshold_trains_tokens_past_one_half_only_in_the_tail(tmp_path, pb8):
    """memft-ot with --tail-threshold 0.9: a token at p = 0.7 is not trained (the paper's threshold 0.5) until a
    clean check has found the run in its tail; a token at p = 0.95 never is."""
    from types import SimpleNamespace

    import torch

    from memcli.training.trainer import Trainer

    cfg = TrainConfig(corpus=str(pb8), model="tiny", tail_threshold=0.9, max_steps=1, gguf="off")
    t = Trainer(cfg, tmp_path / "run", log=lambda m: None)
    try:
        ce = -torch.log(torch.tensor([[0.3, 0.7, 0.95]]))
        batch = SimpleNamespace(mask=torch.ones_like(ce, dtype=torch.bool))
        _, hard = t.objective(ce, None, batch, [0])
        assert hard == 1  # p = 0.3 only
        t.tail = True
        _, hard = t.objective(ce, None, batch, [0])
        assert hard == 2  # p = 0.3 and 0.7
    finally:
        t.close()


def test_a_run_recorded_before_a_setting_existed_trained_with_its_old_behaviour():
    """A config.yaml that lacks a setting added since (here --tail-threshold) recorded a run that trained the old
    way (0.5: the paper's threshold throughout): resuming it with that value is no change, with another it is."""
    import dataclasses

    from memcli.training.config import setting_differences

    saved = {k: v for k, v in dataclasses.asdict(TrainConfig()).items() if k != "tail_threshold"}
    assert setting_differences(saved, TrainConfig(tail_threshold=0.5)) == []
    assert [d[0] for d in setting_differences(saved, TrainConfig(tail_threshold=0.9))] == ["tail_threshold"]


@pytest.mark.parametrize("tail_from, in_tail", [(0.0, True), (1.0, False)])
def test_tail_from_decides_when_the_tail_starts(tmp_path, pb8, tail_from, in_tail):
    """--tail-from 0: the tail (and its threshold) from the first clean check; 1: only once every answer token is
    past p = 0.5, which two steps of a tiny run do not reach."""
    from memcli.training.trainer import Trainer

    cfg = TrainConfig(corpus=str(pb8), model="tiny", tail_from=tail_from, max_steps=2, check_every=1, gguf="off")
    t = Trainer(cfg, tmp_path / "run", log=lambda m: None)
    t.run()
    assert t.tail is in_tail


def test_tail_lr_scales_the_learning_rate_once_the_run_is_in_its_tail(tmp_path, pb8):
    """--tail-lr 0.5 with the tail from the first clean check (--tail-from 0, a check after every step): the
    schedule's next learning rate after that check is halved; steps 1 and 2 had theirs set before it."""
    from memcli.training.trainer import Trainer

    cfg = TrainConfig(corpus=str(pb8), model="tiny", tail_from=0.0, tail_lr=0.5, schedule="constant", lr=0.01,
                      max_steps=4, check_every=1, log_every=1, gguf="off")
    Trainer(cfg, tmp_path / "run", log=lambda m: None).run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if "lr" in r] == pytest.approx([0.01, 0.01, 0.005, 0.005])


def test_latest_pass_counts_what_each_entry_last_saw():
    """Hand-made CE: p = 0.9, 0.4 | 0.3, 0.8 (a pad slot off the mask), then entry 0 again, all past 0.5."""
    import math

    import torch

    from memcli.training.forward import LatestPass

    latest = LatestPass(3)
    ce = -torch.log(torch.tensor([[0.9, 0.4], [0.8, 0.3]]))
    mask = torch.tensor([[True, True], [True, False]])
    latest.update([0, 2], ce * mask, mask)
    assert latest.hard.tolist() == [1, -1, 0] and latest.above == pytest.approx(2 / 3)  # entry 1 not seen
    latest.update([0], -torch.log(torch.tensor([[0.9, 0.6]])), torch.ones(1, 2, dtype=torch.bool))
    assert latest.hard.tolist() == [0, -1, 0] and latest.above == 1.0
    margin = torch.tensor([[math.inf, 0.5]])  # --margin 1: a token past p = 0.5 but under the margin counts
    latest.update([0], -torch.log(torch.tensor([[0.9, 0.6]])), torch.ones(1, 2, dtype=torch.bool), margin, 1.0)
    assert latest.hard.tolist() == [1, -1, 0]


@pytest.mark.parametrize("settings, clean_steps", [
    ({}, [6]),  # gated: the tail is out of reach (tail_from 1), so only the last step's clean pass runs
    ({"gate_checks": False}, [2, 4, 6]),  # every --check-every steps
    ({"dropout": 0.1}, [2, 4, 6]),  # with dropout a training pass is not the clean one: never gated
])
def test_clean_checks_are_gated_by_the_latest_passes(tmp_path, pb8, settings, clean_steps):
    from memcli.training.trainer import Trainer

    cfg = TrainConfig(corpus=str(pb8), model="tiny", tail_from=1.0, max_steps=6, check_every=2, gguf="off",
                      **settings)
    Trainer(cfg, tmp_path / "run", log=lambda m: None).run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "clean_above" in r] == clean_steps
    skipped = [r for r in rows if "latest_above" in r]
    assert [r["step"] for r in skipped] == [s for s in (2, 4) if s not in clean_steps]
    assert all(0 <= r["latest_above"] < 1 for r in skipped)
