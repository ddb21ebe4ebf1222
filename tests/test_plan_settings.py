"""What a law assumes and how `memcli plan` hands it on: the training settings shared by the fitted runs, the
`memcli train` command that realises a plan (parsed by the real command line), the recall target and frontier a
plan trains for, and the refusal to answer outside the lengths and ranks the law measured."""

import math
import re
import shlex
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import run_cli

from memcli.commands.law.fit import fit_law
from memcli.commands.law.plan import plan, train_command
from memcli.commands.law.points import LawError, Point, shared_settings
from memcli.core import runs
from memcli.training.config import TrainConfig


def fake_run(folder, **settings):
    """A run folder as `memcli train` leaves it, as far as the law reads it: config.yaml and summary.json."""
    cfg = TrainConfig(corpus="c.jsonl", **settings)
    runs.write_config(folder, {"settings": cfg.__dict__ | {}})
    runs.write_summary(folder, {"rank": cfg.rank, "answer_tokens": 100, "l_init": 10.0, "l_final": 5.0,
                                "delta_l": 5.0, "method": cfg.method})
    return Point(x=cfg.rank, length=100, delta_l=5.0, l_final=5.0, l_init=10.0, rank=cfg.rank, method=cfg.method,
                 source=str(folder / runs.SUMMARY))


def test_shared_settings_are_what_every_run_has(tmp_path):
    points = [fake_run(tmp_path / "a", rank=1, max_steps=50, batch_size=1, answer_tokens=32, gguf="off", dropout=0.1),
              fake_run(tmp_path / "b", rank=4, max_steps=50, batch_size=1, answer_tokens=64, check_every=7,
                       seed=3, dropout=0.1)]
    settings, differing = shared_settings(points)
    # per-cell settings (rank, answer tokens, corpus, the replicate's seed) and bookkeeping (gguf, check_every)
    # are not assumptions
    for key in ("rank", "answer_tokens", "corpus", "seed", "gguf", "check_every"):
        assert key not in settings
    assert differing == []
    points.append(fake_run(tmp_path / "c", rank=1, max_steps=50, batch_size=1, lr=3e-3, dropout=0.1))
    assert shared_settings(points)[1] == ["lr"]
    assert settings["max_steps"] == 50 and settings["batch_size"] == 1 and settings["method"] == "memft-ot"
    assert settings["lr"] == 1e-2 and settings["dropout"] == 0.1
    # a table row (no run folder) contributes nothing
    assert shared_settings([Point(x=1, length=10, delta_l=1.0, source="t.csv")]) == ({}, [])


def test_train_command_realises_the_law_settings(tmp_path, monkeypatch):
    settings = {**TrainConfig().__dict__, "max_steps": 50, "batch_size": 1, "method": "sft", "dropout": 0.0,
                "chat_template": True, "eos": False, "curriculum_epochs": [5, 10, 15, 20],
                "modules": ["up_proj", "down_proj"]}
    for key in ("rank", "answer_tokens", "corpus", "gguf", "check_every", "gate_checks", "checkpoint_every",
                "log_every", "device", "allow_conflicting_keys"):  # not part of a law's settings
        settings.pop(key)
    command = train_command(settings, 6, str(tmp_path / "c.jsonl"), str(tmp_path / "run"))
    assert command.startswith("memcli train ") and "--rank 6" in command
    assert "--lr 0.01" in command  # spelled at its default too: a later change of default does not change the plan
    assert "--no-eos" in command and "--no-until-recall" in command  # a flag off is an option the command takes
    assert "gate-checks" not in command  # bookkeeping: the planned run checks as train does by default
    (tmp_path / "c.jsonl").write_text('{"key": "a:", "value": " 1"}\n')

    seen = {}

    class Stop(Exception):
        pass

    class Capture:
        def __init__(self, cfg, *args, **kwargs):
            seen["cfg"] = cfg
            raise Stop

    monkeypatch.setattr("memcli.training.trainer.Trainer", Capture)
    with pytest.raises(Stop):
        run_cli(*shlex.split(command)[1:])
    cfg = seen["cfg"]
    assert cfg.rank == 6
    for key, value in settings.items():
        assert getattr(cfg, key) == value, key
    assert cfg.gate_checks == TrainConfig().gate_checks

    # a law recorded before a setting existed: its command gives that setting the value its runs had
    older = {k: v for k, v in settings.items() if k not in ("tail_threshold", "lora_plus", "schedule")}
    command = train_command(older, 6, str(tmp_path / "c.jsonl"), str(tmp_path / "run"))
    assert "--tail-threshold 0.5" in command and "--lora-plus 1.0" in command and "--schedule linear" in command
    with pytest.raises(Stop):
        run_cli(*shlex.split(command)[1:])
    cfg = seen["cfg"]
    assert (cfg.tail_threshold, cfg.lora_plus, cfg.schedule) == (0.5, 1.0, "linear")


def test_plan_refuses_lengths_outside_the_measured_range_unless_asked():
    points = [Point(x=r, length=n, delta_l=2.0 * r ** 0.5 * n ** -0.4 + 0.1, l_final=5.0, l_init=8.0, rank=r)
              for r in (1, 2, 4, 8) for n in (50, 100, 200, 400)]
    # a saturated run at a longer length still counts as measured
    points.append(Point(x=8, length=800, delta_l=7.5, l_final=0.5, l_init=8.0, rank=8))
    law = fit_law(points, n_boot=10, seed=0)
    assert law.l_range == [50, 400] and law.measured_l_range == [50, 800]
    assert plan(law, 800, 1.0).status in ("ok", "minimum")
    with pytest.raises(LawError, match=r"outside the lengths this law was measured on \(50 to 800\)"):
        plan(law, 20, 1.0)
    result = plan(law, 1600, 1.0, extrapolate=True)
    assert any("1,600" in note for note in result.extrapolation)


def test_recall_loss_and_the_recall_goal():
    from memcli.commands.law.points import recall_loss

    def p(l_final, exact):
        return Point(x=1, length=10, delta_l=1.0, l_final=l_final, exact_match=exact)
    # sorted by L_final: 0.02 (1.0), 0.05 (0.96), 0.08 (0.90) -> every run up to 0.05 recalled >= 95 %
    assert recall_loss([p(0.08, 0.90), p(0.02, 1.0), p(0.05, 0.96), p(0.5, 1.0)]) == 0.05
    assert recall_loss([p(0.01, 0.5), p(0.02, 1.0)]) is None
    assert recall_loss([Point(x=1, length=10, delta_l=1.0, l_final=0.01)]) is None  # exact match unknown

    points = [Point(x=r, length=n, delta_l=2.0 * r ** 0.5 * n ** -0.4 + 0.1, l_final=5.0, l_init=8.0, rank=r,
                    exact_match=0.0) for r in (1, 2, 4, 8) for n in (50, 100, 200, 400)]
    points.append(Point(x=8, length=50, delta_l=7.47, l_final=0.03, l_init=7.5, rank=8, exact_match=1.0))
    law = replace(fit_law(points, n_boot=0), recall_frontier=None)  # the target alone
    assert law.recall_l_final == 0.03
    # on the law's scale that run is predicted at 7.5 - (2 sqrt(8) 50^-0.4 + 0.1) = 6.22, above ln 2 - 0.1: the
    # recall goal keeps the paper's target
    assert law.recall_predicted_l_final == pytest.approx(7.5 - (2.0 * 8 ** 0.5 * 50 ** -0.4 + 0.1), abs=1e-6)
    assert plan(law, 100, 2.0, extrapolate=True).target_l_final == pytest.approx(math.log(2) - 0.1)


def test_the_recall_goal_aims_the_prediction_at_the_loss_its_runs_recalled_at():
    """A saturated run the law over-predicts (observed L_final 0.05 from L_init 1.0, the law's delta_l 1.28 says
    -0.28): the plan's target is that predicted -0.28, not the observed 0.05, so it asks for more capacity."""
    def dl(r, n):
        return 2.0 * r ** 0.5 * n ** -0.4 + 0.1
    points = [Point(x=r, length=n, delta_l=dl(r, n), l_final=5.0 - dl(r, n), l_init=5.0, rank=r, exact_match=0.0)
              for r in (1, 4, 16, 64) for n in (50, 100, 200, 400)]
    points.append(Point(x=8, length=50, delta_l=0.95, l_final=0.05, l_init=1.0, rank=8, exact_match=1.0))
    law = fit_law(points, n_boot=0)
    assert law.recall_frontier == [[50, None], [100, None], [200, None], [400, None]]  # rank 64 failed at 50
    law = replace(law, recall_frontier=None)  # the target alone (the frontier: the tests below)
    by_hand = 1.0 - dl(8, 50)  # -0.2828
    assert law.recall_l_final == 0.05
    assert law.recall_predicted_l_final == pytest.approx(by_hand, abs=1e-6)
    recall, loss = plan(law, 100, 2.0), plan(law, 100, 2.0, goal="loss")
    assert recall.target_l_final == pytest.approx(by_hand, abs=1e-6) and "95 %" in recall.sentence
    # the smallest rank with 2.0 - dl(r, 100) <= -0.2828: dl >= 2.2828 -> sqrt(r) >= 2.1828 / (2 * 100^-0.4)
    assert recall.rank == math.ceil((2.1828427 / (2 * 100 ** -0.4)) ** 2)
    assert loss.target_l_final == pytest.approx(math.log(2) - 0.1) and loss.rank < recall.rank


def smallest_rank_by_search(law_path, length, l_init):
    """The plan's answer computed independently: walk the ranks up from 1 until the law's predicted L_final (from
    the coefficients in the file) reaches the file's recall target."""
    import json

    law = json.loads(Path(law_path).read_text())
    c = law["coefficients"]
    recall = law.get("recall_predicted_l_final")
    recall = recall if recall is not None else law["recall_l_final"]
    target = min(math.log(2) - 0.1, recall if recall is not None else 9.0)
    for rank in range(1, 4097):
        if l_init - (c["C"] * rank ** c["alpha"] * length ** -c["beta"] + c["b"]) <= target:
            return rank
    return None


@pytest.mark.parametrize("kind", ["random"])
@pytest.mark.slow  # the default model
def test_the_default_model_plans_with_its_shipped_law(tmp_path, kind):
    from memcli.core import models

    laws = models.shipped_laws(models.resolve(None))
    assert set(laws) == {"random"} and all(p.is_file() for p in laws.values())
    import json

    law = json.loads(laws[kind].read_text())
    assert law["settings"]["model"] == "smollm2-135m" and law["settings"]["method"] == TrainConfig().method
    # a length halfway between two measured ones, the longer with a rank in the recall frontier
    frontier = law["recall_frontier"]
    i = next(i for i in range(1, len(frontier)) if frontier[i][1] is not None)
    length, frontier_rank = (frontier[i - 1][0] + frontier[i][0]) // 2, int(frontier[i][1])
    corpus = tmp_path / "c.jsonl"
    if kind == "phonebook":
        args = ("data", "phonebook", "--entries", str(int(length) // 10), "--seed", "11")
    else:
        args = ("data", "random", "--tokens", str(int(length)), "--seed", "11")
    assert run_cli(*args, "--out", corpus).exit_code == 0
    result = run_cli("plan", corpus)  # no --law: chosen by the corpus's shape
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert f"the {kind} law shipped for smollm2-135m" in text
    tokens = int(re.search(r"for ([\d,]+) answer tokens", text).group(1).replace(",", ""))
    l_init = float(re.search(r"from L_init ([\d.]+)", text).group(1))
    rank = int(re.search(r"is rank (\d+)", text).group(1))
    # the printed L_init is rounded to 3 places: the search may land one rank either side of that boundary
    assert abs(rank - smallest_rank_by_search(laws[kind], tokens, l_init)) <= 1
    # the command trains the interval's upper end, or the frontier's rank at the next measured length if higher
    low, high = (int(v) for v in re.search(r"interval from the bootstrap: rank (\d+) to (\d+)", text).groups())
    train = max(high, frontier_rank)
    assert low <= rank <= high and f"memcli train {corpus} --out runs/planned --rank {train} " in text
    assert "Predicted L_final at that rank" in text

    short = tmp_path / "short.jsonl"
    assert run_cli("data", "random", "--tokens", "4", "--seed", "1", "--out", short).exit_code == 0
    result = run_cli("plan", short, "--law", kind)
    assert result.exit_code == 2 and "outside the lengths this law was measured on" in result.output


def test_a_kind_without_a_shipped_law_is_said_with_its_reason(tmp_path):
    corpus = tmp_path / "pb.jsonl"
    assert run_cli("data", "phonebook", "--entries", "12", "--out", corpus).exit_code == 0
    result = run_cli("plan", corpus)  # several entries: the phonebook law, which the default model lacks
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "no phonebook law ships for model smollm2-135m: its sweep did not follow the law" in text
    assert "--law law.json" in text and "--probe" in text


def test_recall_frontier_is_the_smallest_rank_above_which_every_run_recalled():
    from memcli.commands.law.points import recall_frontier

    def p(r, n, exact):
        return Point(x=r, length=n, delta_l=1.0, l_final=1.0, exact_match=exact)
    points = [p(1, 16, 0.0), p(2, 16, 1.0), p(2, 16, 0.96), p(4, 16, 1.0),    # 16: rank 2 (both seeds >= 95 %)
              p(4, 32, 1.0), p(8, 32, 0.5), p(16, 32, 1.0), p(16, 32, 1.0),   # 32: rank 8 failed once -> 16
              p(8, 64, 0.0), p(16, 64, 0.9),                                  # 64: none
              Point(x=1, length=128, delta_l=1.0)]                            # exact match unknown: no entry
    assert recall_frontier(points) == [[16, 2], [32, 16], [64, None]]


def test_plan_trains_at_least_the_frontier_of_the_next_measured_length():
    def dl(r, n):
        return 2.0 * r ** 0.5 * n ** -0.4 + 0.1
    points = [Point(x=r, length=n, delta_l=dl(r, n), l_final=5.0 - dl(r, n), l_init=5.0, rank=r)
              for r in (1, 4, 16, 64) for n in (50, 100, 200, 400)]
    law = replace(fit_law(points, n_boot=0), recall_frontier=[[50, 4], [100, 16], [200, 64], [400, None]])
    # 60 tokens: the law's own answer (2.0 - dl(r, 60) <= 0.593: r = 12) is below the frontier at 100 tokens, 16
    result = plan(law, 60, 2.0)
    assert result.rank == math.ceil((1.3069 / (2 * 60 ** -0.4)) ** 2) == 12
    assert result.frontier_length == 100 and result.train_rank == 16 and "100 answer tokens" in result.train_reason
    # the goal "loss" is the paper's plan: no frontier
    assert plan(law, 60, 2.0, goal="loss").train_rank == 12
    # at 300 tokens the next measured length (400) has no rank that recalled: refused, shown with --extrapolate
    with pytest.raises(LawError, match=r"no run of this law recalled a value of 400 tokens.*--extrapolate"):
        plan(law, 300, 1.0)
    assert plan(law, 300, 1.0, extrapolate=True).frontier_rank is None
