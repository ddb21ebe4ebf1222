"""`memcli plan --probe`: the law fitted on nested prefixes of the user's own corpus, and the sweep rule it uses
(a rank above one that certified every entry at a length is not trained)."""

import json
from pathlib import Path

import pytest
import yaml
from helpers import run_cli

from memcli.commands.law.probe import probe_lengths, run_probe
from memcli.core.errors import UserError
from memcli.training import sweep
from memcli.training.config import TrainConfig


def fake_training(monkeypatch, capacity: int, trained: list | None = None) -> None:
    """Replace the sweep's training by a rule (rank r certifies l tokens when r * capacity >= l) that leaves a run
    folder as train does, in brief; `trained` collects the (rank, answer tokens) of each run trained."""
    def fake_cell(settings, run_dir, device=None, threads=None):
        r, n = settings["rank"], settings["answer_tokens"]
        if trained is not None:
            trained.append((r, n))
        certified = r * capacity >= n
        summary = {"all_certified": certified, "rank": r, "answer_tokens": n, "wall_seconds": 2.0, "examples": n,
                   "l_init": 3.0, "l_final": 0.1 if certified else 1.5, "delta_l": 2.9 if certified else 1.5,
                   "exact_match": float(certified), "steps": 10}
        Path(run_dir).mkdir(parents=True)
        (Path(run_dir) / "config.yaml").write_text(yaml.safe_dump({"settings": settings}))
        (Path(run_dir) / "summary.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(sweep, "run_cell", fake_cell)


def test_probe_lengths_are_shares_of_the_corpus():
    assert probe_lengths(640, 10, (0.0625, 0.125, 0.1875, 0.25)) == [40, 80, 120, 160]
    assert probe_lengths(100, 30, (0.1, 0.5)) == [30, 50]  # never shorter than the first entry
    for shares in ((0.1,), (0.5, 1.0), (0.0, 0.5), (0.01, 0.02)):  # one length; the whole; zero; both = first entry
        with pytest.raises(UserError):
            probe_lengths(100, 30, shares)


def test_sweep_skips_ranks_above_one_that_certified(tmp_path, monkeypatch):
    """Cells run one at a time in grid order; once a rank certifies a length, larger ranks at that length are not
    trained. Here rank r certifies l tokens when r * 20 >= l (a made-up capacity)."""
    trained = []

    def fake_cell(settings, run_dir, device=None, threads=None):
        trained.append((settings["rank"], settings["answer_tokens"]))
        return {"all_certified": settings["rank"] * 20 >= settings["answer_tokens"], "rank": settings["rank"]}

    monkeypatch.setattr(sweep, "run_cell", fake_cell)
    base = TrainConfig(corpus="unused.jsonl", model="tiny")
    out = sweep.run_sweep(base, [1, 2, 4, 8], [20, 40, 80], tmp_path / "s", skip_above_certified=True)
    assert trained == [(1, 20), (1, 40), (2, 40), (1, 80), (2, 80), (4, 80)]
    assert len(out) == len(trained)
    trained.clear()
    sweep.run_sweep(base, [1, 2], [20], tmp_path / "t")  # without the rule every cell trains
    assert trained == [(1, 20), (2, 20)]
    with pytest.raises(UserError, match="needs --jobs 1"):  # cells in parallel cannot wait for a lower rank
        sweep.run_sweep(base, [1, 2], [20], tmp_path / "u", jobs=2, skip_above_certified=True)


@pytest.mark.slow  # trains a small sweep on the tiny model
def test_probe_fits_a_law_and_plan_uses_it(tmp_path):
    corpus = tmp_path / "pb.jsonl"
    assert run_cli("data", "phonebook", "--entries", "24", "--seed", "3", "--out", corpus).exit_code == 0
    base = TrainConfig(corpus=str(corpus), model="tiny", epochs=12, check_every=5)
    probe = run_probe(base, 240, 10, tmp_path / "probe", ranks=(1, 2, 4), shares=(0.125, 0.25, 0.5))
    assert probe.lengths == [30, 60, 120]
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "probe").glob("*/summary.json")]
    assert probe.runs == len(summaries) >= 5
    assert probe.examples == sum(s["examples"] for s in summaries)
    assert probe.train_seconds == pytest.approx(sum(s["wall_seconds"] for s in summaries))
    assert all(s["stop_reason"] in ("certified", "budget") for s in summaries)
    law = json.loads(probe.law.read_text())
    assert law["measured_l_range"] == [30, 120] and law["settings"]["until_recall"] is True
    result = run_cli("plan", corpus, "--law", probe.law, "--model", "tiny", "--extrapolate")
    assert result.exit_code == 0, result.output
    assert "for 240 answer tokens" in " ".join(result.stdout.split())


@pytest.mark.parametrize("args, message", [
    (["--probe", "--tokens", "100"], "--probe fits the law on a CORPUS"),
    (["CORPUS", "--probe", "--law", "random"], "--probe fits the law on a CORPUS"),
    (["CORPUS", "--probe", "--probe-shares", "0.5,2"], "--probe-shares must lie between 0 and 1"),
    (["CORPUS", "--probe", "--probe-ranks", "0,1"], "--probe-ranks must be positive ranks"),
    (["CORPUS", "--probe", "--probe-shares", "half"], "--probe-shares takes comma-separated numbers"),
    (["CORPUS", "--force"], "--force retrains a probe's stale runs: it goes with --probe"),
])
def test_bad_probe_options_exit_2(tmp_path, args, message):
    corpus = tmp_path / "pb.jsonl"
    assert run_cli("data", "phonebook", "--entries", "8", "--out", corpus).exit_code == 0
    result = run_cli("plan", *[corpus if a == "CORPUS" else a for a in args], "--model", "tiny",
                     "--probe-out", tmp_path / "probe")
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "probe").exists()


@pytest.mark.parametrize("capacity, lengths, whole", [
    (1000, [10, 20, 40, 80, 100], 1),  # rank 1 certifies the whole corpus: no law needed
    (90, [10, 20, 40, 80, 100], 2),  # rank 1 fails only on the whole corpus, where rank 2 certifies it
    (30, [10, 20, 40, 80, 100], 4),  # 4 runs fail before the whole corpus: still too few for a law
    (0, [10, 20, 40, 80, 100], None),  # nothing certifies anything: 5 runs of one rank, no law, refused
])
def test_probe_goes_longer_while_too_few_runs_fail(tmp_path, monkeypatch, capacity, lengths, whole):
    """Saturated runs say nothing about capacity: while fewer than 6 runs failed to certify, the probe doubles its
    longest prefix (at most the whole corpus, 100 tokens here); rank r certifies l tokens when r * capacity >= l."""
    from memcli.commands.law import probe as probe_mod

    fake_training(monkeypatch, capacity)
    base = TrainConfig(corpus="unused.jsonl", model="tiny")
    if whole is None:
        with pytest.raises(UserError, match="give no law"):
            run_probe(base, 100, 10, tmp_path / "p", ranks=(1,), shares=(0.1, 0.2))
        return
    probe = probe_mod.run_probe(base, 100, 10, tmp_path / "p", ranks=(1, 2, 4), shares=(0.1, 0.2))
    assert (probe.lengths, probe.whole_rank, probe.law) == (lengths, whole, None)
    trained = [json.loads(p.read_text()) for p in (tmp_path / "p").glob("*/summary.json")]
    by_hand = [(r, n) for n in lengths for r in (1, 2, 4)  # every cell up to the first rank that certifies
               if all(q * capacity < n for q in (1, 2, 4) if q < r)]
    assert sorted((t["rank"], t["answer_tokens"]) for t in trained) == sorted(by_hand)
    assert probe.runs == len(trained) and probe.examples == sum(t["answer_tokens"] for t in trained)
    assert probe.settings["until_recall"] is True and "rank" not in probe.settings  # the command's settings


def test_plan_probe_prints_the_measured_rank_when_it_reached_the_whole_corpus(tmp_path, monkeypatch):
    """plan --probe as a user runs it, with the training faked (rank r certifies l tokens when 50 r >= l): the
    probe reaches the whole corpus, where rank 2 was the smallest to certify, and prints that rank's command."""
    fake_training(monkeypatch, 50)
    corpus = tmp_path / "pb.jsonl"
    assert run_cli("data", "phonebook", "--entries", "8", "--out", corpus).exit_code == 0  # 80 answer tokens
    result = run_cli("plan", corpus, "--model", "tiny", "--probe", "--probe-out", tmp_path / "probe",
                     "--probe-ranks", "1,2", "--probe-shares", "0.125,0.25")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "rank 2 was the smallest that certified it" in text
    assert f"memcli train {corpus} --out runs/planned --rank 2 " in text and "--until-recall" in text
    assert "The probe trained 5 runs" in text  # rank 1 at 10, 20, 40 and 80 tokens, rank 2 at 80 only


def test_a_probe_made_under_other_settings_is_refused_then_retrained_with_force(tmp_path, monkeypatch):
    """After a change of train's defaults a rerun of plan --probe finds runs trained otherwise: one line naming the
    run and the setting, exit 2, nothing retrained; with --force exactly the stale runs are trained again."""
    trained = []
    fake_training(monkeypatch, 50, trained)
    corpus, probe = tmp_path / "pb.jsonl", tmp_path / "probe"
    assert run_cli("data", "phonebook", "--entries", "8", "--out", corpus).exit_code == 0
    args = ("plan", corpus, "--model", "tiny", "--probe", "--probe-out", probe, "--probe-ranks", "1,2",
            "--probe-shares", "0.125,0.25")
    assert run_cli(*args).exit_code == 0
    config = probe / "rank1-l20" / "config.yaml"
    saved = yaml.safe_load(config.read_text())
    saved["settings"]["lr"] = 0.02  # as an older default would have trained it
    config.write_text(yaml.safe_dump(saved))
    trained.clear()
    result = run_cli(*args)
    assert result.exit_code == 2 and trained == []
    assert "rank1-l20" in result.output and "--lr 0.02 -> 0.01" in " ".join(result.output.split())
    assert "--force" in result.output and "--probe-out" in result.output
    result = run_cli(*args, "--force")
    assert result.exit_code == 0, result.output
    assert trained == [(1, 20)]  # the stale run only; the others are kept
    assert yaml.safe_load(config.read_text())["settings"]["lr"] == 0.01
