"""`memcli train` on the tiny model: certified recall, the run folder, reloading, resume, bad input."""

import json
import re

import pytest
import torch
import yaml
from helpers import run_cli, run_memcli

from memcli.core import corpus, models
from memcli.core.scoring import LN2
from memcli.training import forward
from memcli.training.config import TrainConfig
from memcli.training.trainer import Trainer

SUMMARY_KEYS = {"method", "rank", "params", "answer_tokens", "entries", "l_init", "l_final", "delta_l",
                "exact_match", "certified", "steps", "wall_seconds"}


@pytest.mark.slow  # trains until recall in a subprocess
def test_memft_ot_memorises_pb8_and_stops_by_itself(pb8, tmp_path):
    run = tmp_path / "run"
    result = run_memcli("train", pb8, "--out", run, "--model", "tiny", "--until-recall")
    assert result.returncode == 0, result.stderr
    assert "certified recall of every entry" in result.stderr
    summary = json.loads((run / "summary.json").read_text())
    loc = summary["locality"]  # and the summary printed says what memorising cost elsewhere, as measured
    printed = " ".join(result.stderr.split())
    assert f"on {loc['tokens']:,} tokens of the base's own text" in printed
    assert f"at {loc['argmax_agreement']:.1%} of positions" in printed and f"{loc['kl']:.3f} nats/token" in printed
    assert SUMMARY_KEYS <= set(summary)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    checks = [r["step"] for r in rows if "exact_match" in r or "latest_above" in r]  # clean checks, gated or run
    assert checks and checks == [int(s) for s in re.findall(r"^step (\d+)/", result.stderr, flags=re.M)]
    assert summary["method"] == "memft-ot" and summary["rank"] == 8 and summary["entries"] == 8
    assert summary["answer_tokens"] == 80  # 8 numbers of 10 one-digit tokens
    # Rank 8 on the middle layer's three MLP projections of a d=64, 256-wide MLP: 8 * (64+256) * 3.
    assert summary["params"] == 8 * (64 + 256) * 3
    assert summary["all_certified"] and summary["certified"] == 1.0 and summary["exact_match"] == 1.0
    assert summary["stop_reason"] == "certified" and summary["steps"] < summary["total_steps"]
    assert summary["l_final"] < LN2 < summary["l_init"]
    assert summary["delta_l"] == pytest.approx(summary["l_init"] - summary["l_final"])

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, summary["steps"] + 1))
    assert {"step", "epoch", "lr", "objective", "ce", "above", "tokens_per_s"} <= set(rows[0])
    checks = [r for r in rows if "exact_match" in r]
    assert checks[-1]["step"] == summary["steps"] and checks[-1]["certified"] == 1.0
    assert all(r["certified"] < 1.0 for r in checks[:-1])  # it stopped at the first certified check
    assert rows[0]["lr"] == pytest.approx(1e-2)

    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["settings"]["seed"] == 0 and config["settings"]["method"] == "memft-ot"
    assert {"torch", "transformers", "peft", "memcli"} <= set(config["versions"])
    assert config["resolved"]["layers"] == [2]
    assert config["resolved"]["modules"] == ["gate_proj", "up_proj", "down_proj"]
    assert (run / "adapter" / "adapter_config.json").exists()
    assert list((run / "checkpoints").glob("step-*.pt"))


def test_saved_adapter_reloads_with_the_same_probabilities(pb8, tmp_path):
    from peft import PeftModel

    cfg = TrainConfig(corpus=str(pb8), model="tiny", max_steps=15, check_every=15)
    trainer = Trainer(cfg, tmp_path / "run", log=lambda m: None)
    trainer.run()
    trainer.model.eval()
    batch = forward.collate(trainer.examples, trainer.pad_id, "cpu")
    with torch.no_grad():
        trained_ce, _, _ = forward.answer_ce(trainer.model, batch)
        base, _ = models.load_model(models.resolve("tiny"))
        reloaded = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
        reloaded_ce, _, _ = forward.answer_ce(reloaded, batch)
        with reloaded.disable_adapter():
            base_ce, _, _ = forward.answer_ce(reloaded, batch)
    assert torch.allclose(trained_ce, reloaded_ce, atol=1e-6)
    assert not torch.allclose(trained_ce, base_ce, atol=1e-2)  # the adapter is really there


def test_l_init_is_measured_once_with_the_adapter_disabled(pb8, tmp_path, monkeypatch):
    from peft.tuners.lora import LoraLayer

    cfg = TrainConfig(corpus=str(pb8), model="tiny", max_steps=4, check_every=2, gate_checks=False)  # both checks
    trainer = Trainer(cfg, tmp_path / "run", log=lambda m: None)
    with torch.no_grad():  # B is zero at initialisation; make the adapter change the outputs from the start
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 2.0)
    passes = []  # (adapter disabled?) for every clean pass
    real = forward.evaluate

    def spy(model, *args, **kwargs):
        passes.append(all(m.disable_adapters for m in model.modules() if isinstance(m, LoraLayer)))
        return real(model, *args, **kwargs)
    monkeypatch.setattr(forward, "evaluate", spy)
    batch = forward.collate(trainer.examples, trainer.pad_id, "cpu")
    with torch.no_grad():
        adapted_ce, _, _ = forward.answer_ce(trainer.model, batch)
    summary = trainer.run()

    base, tok = models.load_model(models.resolve("tiny"))  # the plain base model, no PEFT at all
    with torch.no_grad():
        ce, _, _ = forward.answer_ce(base, forward.collate(corpus.load_examples(pb8, tok), tok.pad_token_id, "cpu"))
    n = batch.mask.sum()
    assert summary["l_init"] == pytest.approx((ce.sum() / n).item(), rel=1e-5)
    assert (adapted_ce - ce).abs().max() > 0.5  # the adapter does change the per-token loss
    assert passes.count(True) == 1 and passes[0] is True  # measured once, before training, adapter off
    assert passes.count(False) == 2  # the clean checks at steps 2 and 4 use the adapter


class Interrupt(Exception):
    pass


@pytest.mark.slow  # trains three runs
def test_resume_ends_where_an_uninterrupted_run_ends(pb8, tmp_path):
    settings = dict(corpus=str(pb8), model="tiny", max_steps=30, checkpoint_every=10, check_every=10, batch_size=3)
    whole = Trainer(TrainConfig(**settings), tmp_path / "whole", log=lambda m: None).run()

    def interrupt_at_25(step, total, row):
        if step == 25:
            raise Interrupt

    with pytest.raises(Interrupt):
        Trainer(TrainConfig(**settings), tmp_path / "cut", log=lambda m: None).run(interrupt_at_25)
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").glob("*.pt")) == \
        ["step-00000010.pt", "step-00000020.pt"]
    resumed = Trainer(TrainConfig(**settings), tmp_path / "cut", resume=True, log=lambda m: None).run()

    def comparable(s):
        return {k: v for k, v in s.items() if k != "wall_seconds"}
    assert comparable(resumed) == comparable(whole)

    def metrics(run):
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
    assert metrics("cut") == metrics("whole")


@pytest.mark.slow  # trains a run
def test_resume_restores_what_gates_the_clean_checks(pb8, tmp_path):
    """Each entry's latest training pass decides whether a clean check can be skipped; an entry not seen since a
    resume must count as the uninterrupted run sees it (here an epoch is 8 steps, longer than a check interval)."""
    settings = dict(corpus=str(pb8), model="tiny", max_steps=30, checkpoint_every=10, check_every=5, batch_size=1)
    seen = {}

    def interrupt_at_15(step, total, row):
        trainer = seen["trainer"]
        if step == 10:
            seen["hard"], seen["tokens"] = trainer.latest.hard.copy(), trainer.latest.tokens.copy()
        if step == 15:
            raise Interrupt

    seen["trainer"] = Trainer(TrainConfig(**settings), tmp_path / "cut", log=lambda m: None)
    with pytest.raises(Interrupt):
        seen["trainer"].run(interrupt_at_15)
    seen["trainer"].close()
    assert (seen["hard"] >= 0).all()  # every entry had been seen by step 10
    resumed = Trainer(TrainConfig(**settings), tmp_path / "cut", resume=True, log=lambda m: None)
    assert resumed.step == 10
    assert resumed.latest.hard.tolist() == seen["hard"].tolist()
    assert resumed.latest.tokens.tolist() == seen["tokens"].tolist()
    resumed.close()


@pytest.mark.parametrize("method, extra", [("sft", []), ("memft-sw", ["--curriculum-epochs", "1,2,3,4"]),
                                           ("memft-ot", ["--no-hard-tokens", "skip"])])
def test_other_methods_run_and_record_their_form(pb8, tmp_path, method, extra):
    run = tmp_path / "run"
    result = run_cli("train", pb8, "--out", run, "--model", "tiny", "--method", method, "--max-steps", "6", *extra)
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == method and summary["steps"] == 6
    assert summary["sw_form"] == ("temporal" if method == "memft-sw" else None)


class _Mask:
    def __init__(self, mask):
        self.mask = mask


@pytest.mark.parametrize("method", ["sft", "memft-ot", "memft-sw"])
def test_each_method_weighs_the_tokens_as_documented(pb8, tmp_path, method):
    """The loss each method builds from the same per-token CE, against hand-computed weighted means."""
    trainer = Trainer(TrainConfig(corpus=str(pb8), model="tiny", method=method, max_steps=1), tmp_path / "r",
                      log=lambda m: None)
    ce = torch.tensor([[0.1, 2.0, 0.3, 4.0], [0.2, 0.5, 0.05, 9.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    loss, hard = trainer.objective(ce, torch.ones_like(mask), _Mask(mask), [0, 1])
    assert hard == 2  # 2.0 and 4.0 are at or above ln 2; 9.0 is off the mask
    want = {"sft": (0.1 + 2.0 + 0.3 + 4.0 + 0.2 + 0.5 + 0.05) / 7,
            "memft-ot": (2.0 + 4.0) / 2,  # only the tokens still at p <= 0.5
            "memft-sw": (2.0 + 4.0) / 2}  # many entries: the temporal form, OT weights
    assert loss.item() == pytest.approx(want[method], rel=1e-6)
    easy = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.2, 0.5, 0.05, 9.0]])
    loss, hard = trainer.objective(easy, torch.ones_like(mask), _Mask(mask), [0, 1])
    assert hard == 0
    if method == "memft-sw":  # nothing above threshold: the temporal form skips the step
        assert loss is None
    else:  # SFT, and MemFT-OT's default fallback: the plain mean
        assert loss.item() == pytest.approx((1.0 + 0.75) / 7, rel=1e-6)


@pytest.mark.slow  # trains until recall
@pytest.mark.filterwarnings("error::UserWarning")  # a skipped update is no misuse of the scheduler
def test_memft_ot_skip_makes_no_update_on_a_certified_batch_and_fallback_does(pb8, tmp_path):
    """--no-hard-tokens skip vs fallback, seen in the adapter weights after one step on a batch whose every
    token is already certified."""
    base = Trainer(TrainConfig(corpus=str(pb8), model="tiny", until_recall=True, check_every=5), tmp_path / "cert",
                   log=lambda m: None)
    assert base.run()["all_certified"]
    state = {k: v.clone() for k, v in base.model.state_dict().items() if "lora_" in k}
    changed = {}
    for mode in ("skip", "fallback"):
        t = Trainer(TrainConfig(corpus=str(pb8), model="tiny", no_hard_tokens=mode, max_steps=1, dropout=0.0,
                                batch_size=8), tmp_path / mode, log=lambda m: None)
        t.model.load_state_dict(state, strict=False)
        row = t.train_step(1, 0, list(range(8)))
        assert row["hard_tokens"] == 0
        changed[mode] = any(not torch.equal(v, state[k]) for k, v in t.model.state_dict().items() if k in state)
    assert changed == {"skip": False, "fallback": True}


def test_temporal_curriculum_exposes_a_growing_prefix_in_training(pb8, tmp_path):
    trainer = Trainer(TrainConfig(corpus=str(pb8), model="tiny", method="memft-sw", curriculum_epochs=[1, 2, 3, 4],
                                  max_steps=1), tmp_path / "r", log=lambda m: None)
    # 8 entries: ceil(20 % of 8) = 2, then 4 (40 %: 3.2 -> 4), 5, 7, all 8; always a prefix of one fixed order.
    orders = [trainer.epoch_order(e) for e in range(6)]
    assert [len(o) for o in orders] == [2, 4, 5, 7, 8, 8]
    assert all(orders[e] == orders[-1][: len(orders[e])] for e in range(6))
    assert sorted(orders[-1]) == list(range(8))


def test_sw_spatial_form_on_one_long_value(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(" ".join(["alpha", "beta", "gamma", "delta"] * 20))
    run = tmp_path / "run"
    result = run_cli("train", path, "--out", run, "--model", "tiny", "--method", "memft-sw", "--max-steps", "3",
                     "--key", "Recite:")
    assert result.exit_code == 0, result.output
    assert json.loads((run / "summary.json").read_text())["sw_form"] == "spatial"
    assert yaml.safe_load((run / "config.yaml").read_text())["resolved"]["sw_form"] == "spatial"


def test_yaml_config_with_command_line_override(pb8, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("rank: 2\nmax-steps: 2\nmethod: sft\n")
    run = tmp_path / "run"
    result = run_cli("train", pb8, "--out", run, "--model", "tiny", "--config", config, "--rank", "4")
    assert result.exit_code == 0, result.output
    settings = yaml.safe_load((run / "config.yaml").read_text())["settings"]
    assert (settings["rank"], settings["max_steps"], settings["method"]) == (4, 2, "sft")


def _bad(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("case, message", [
    ("malformed", r"bad\.jsonl:2: malformed JSON"),
    ("missing", r"bad\.jsonl:1: missing fields"),
    ("empty", r"bad\.jsonl is empty"),
    ("too_long", r"longer than the model's context of 4096"),
    ("rank", r"--rank must be at least 1"),
    ("layer", r"--layers: layer 9 is out of range; the model has layers 0-3"),
    ("module", r"--modules: unknown module 'ffn_proj'"),
    ("model", r"unknown model 'gpt-7'"),
    ("nonfinite", r"non-finite loss .* at step \d+; no good checkpoint had been written"),
])
def test_bad_input_exits_2_and_leaves_no_run_folder(tmp_path, pb8, case, message):
    corpus_path, extra = pb8, []
    if case == "malformed":
        corpus_path = _bad(tmp_path, "bad.jsonl", '{"key": "a", "value": "b"}\n{"key": "a", \n')
    elif case == "missing":
        corpus_path = _bad(tmp_path, "bad.jsonl", '{"name": "a", "value": "b"}\n')
    elif case == "empty":
        corpus_path = _bad(tmp_path, "bad.jsonl", "\n")
    elif case == "too_long":
        corpus_path = _bad(tmp_path, "long.txt", " word" * 5000)
    elif case == "rank":
        extra = ["--rank", "0"]
    elif case == "layer":
        extra = ["--layers", "9"]
    elif case == "module":
        extra = ["--modules", "gate_proj,ffn_proj"]
    elif case == "model":
        extra = ["--model", "gpt-7"]
    elif case == "nonfinite":
        extra = ["--lr", "1e30", "--checkpoint-every", "1000"]
    if case != "model":
        extra += ["--model", "tiny"]
    run = tmp_path / "run"
    result = run_cli("train", corpus_path, "--out", run, "--max-steps", "20", *extra)
    assert result.exit_code == 2
    assert result.stderr.count("error:") == 1
    error = result.stderr[result.stderr.index("error:"):]
    assert len(error.strip().splitlines()) <= 3  # one line, soft-wrapped at the terminal's width
    assert re.search(message, " ".join(error.split())), result.stderr
    assert not run.exists()


def test_existing_run_folder_is_refused_without_resume_or_force(pb8, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("mine")
    result = run_cli("train", pb8, "--out", run, "--model", "tiny", "--max-steps", "1")
    assert result.exit_code == 2 and "exists: use --resume" in result.stderr
    assert (run / "keep.txt").read_text() == "mine"
    result = run_cli("train", pb8, "--out", run, "--model", "tiny", "--max-steps", "1", "--force")
    assert result.exit_code == 0 and not (run / "keep.txt").exists()


def test_nonfinite_loss_keeps_the_last_good_checkpoint(pb8, tmp_path):
    run = tmp_path / "run"
    # A schedule that is fine for the first steps and explodes later is hard to hand-make; instead poison the
    # adapter at step 4 through the progress callback, as a diverging optimiser would. The checkpoint of step 4
    # holds the poisoned weights (the loss of step 5 is the first to show it), so only step 2's is good.
    trainer = Trainer(TrainConfig(corpus=str(pb8), model="tiny", max_steps=10, checkpoint_every=2), run,
                      log=lambda m: None)

    def poison(step, total, row):
        if step == 4:
            for p in trainer.model.parameters():
                if p.requires_grad:
                    p.data.fill_(float("inf"))
    from memcli.core.errors import UserError
    with pytest.raises(UserError, match=r"non-finite loss .* at step 5; kept the last good checkpoint .*step-00000002"):
        trainer.run(poison)
    assert [p.name for p in (run / "checkpoints").glob("*.pt")] == ["step-00000002.pt"]


# --- adapter.gguf: never at the cost of the trained adapter (issue 8, item 2) ---------------------------------

def _dynamic_rope_model(tmp_path):
    """The tiny model with dynamic NTK RoPE scaling (rope_type dynamic): transformers trains it, llama.cpp has no
    equivalent, so GGUF export refuses it."""
    import shutil

    folder = tmp_path / "tiny-dynamic"
    shutil.copytree(models.hf_dir(models.resolve("tiny")), folder)
    config = json.loads((folder / "config.json").read_text())
    rope = dict(config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 10000.0)})
    rope.update(rope_type="dynamic", factor=2.0)
    config["rope_parameters"] = rope
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_unexportable_model_trains_says_so_first_and_keeps_the_adapter(pb8, tmp_path):
    model = _dynamic_rope_model(tmp_path)
    run = tmp_path / "run"
    result = run_cli("train", pb8, "--out", run, "--model", model, "--max-steps", "2")
    assert result.exit_code == 0, result.output
    err = " ".join(result.stderr.split())
    note = err.index("no adapter.gguf will be written")
    assert "RoPE scaling 'dynamic'" in err[note:]
    assert note < err.index("answer tokens, rank 8")  # said before training started
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["gguf"] is None and "RoPE scaling 'dynamic'" in summary["gguf_error"]
    assert (run / "adapter" / "adapter_config.json").exists() and not (run / "adapter.gguf").exists()


def test_gguf_require_refuses_before_any_run_folder(pb8, tmp_path):
    model = _dynamic_rope_model(tmp_path)
    run = tmp_path / "run"
    result = run_cli("train", pb8, "--out", run, "--model", model, "--max-steps", "2", "--gguf", "require")
    assert result.exit_code == 2
    assert "--gguf require" in result.stderr and "RoPE scaling 'dynamic'" in " ".join(result.stderr.split())
    assert not run.exists()


def test_gguf_off_writes_no_gguf_and_bad_value_is_refused(pb8, tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", pb8, "--out", run, "--model", "tiny", "--max-steps", "1", "--gguf", "off")
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["gguf"], summary["gguf_error"]) == (None, None) and not (run / "adapter.gguf").exists()
    result = run_cli("train", pb8, "--out", tmp_path / "r2", "--model", "tiny", "--gguf", "maybe")
    assert result.exit_code == 2 and "--gguf must be one of auto, require, off" in result.stderr
    assert not (tmp_path / "r2").exists()


def test_exportable_model_records_its_gguf(pb8, tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", pb8, "--out", run, "--model", "tiny", "--max-steps", "1")
    assert result.exit_code == 0, result.output
    assert "no adapter.gguf" not in result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["gguf"], summary["gguf_error"]) == ("adapter.gguf", None)
    assert (run / "adapter.gguf").read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("error", ["user", "crash"])
def test_failed_export_is_a_warning_and_resume_returns_the_summary(pb8, tmp_path, monkeypatch, error):
    from memcli.core.errors import UserError
    from memcli.training import trainer  # the exporter as the loop calls it

    def failing(*args, **kwargs):
        if error == "user":
            raise UserError("exporter says no")
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(trainer, "export_adapter", failing)
    run = tmp_path / "run"
    args = ["train", pb8, "--out", run, "--model", "tiny", "--max-steps", "3", "--checkpoint-every", "2"]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    cause = "exporter says no" if error == "user" else "RuntimeError: disk on fire"
    assert "warning: no adapter.gguf written" in result.stderr and cause in " ".join(result.stderr.split())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["gguf"] is None and summary["gguf_error"] == cause
    assert (run / "adapter" / "adapter_config.json").exists() and not (run / "adapter.gguf").exists()
    assert not list(run.glob("*.tmp")) and not (run / "adapter.tmp").exists()
    # --resume finds the finished run (its checkpoint is at step 2, the summary at step 3) and returns it.
    result = run_cli(*args, "--resume")
    assert result.exit_code == 0 and "already finished" in " ".join(result.stderr.split())
    assert json.loads((run / "summary.json").read_text()) == summary


def test_failed_export_with_gguf_require_exits_2_but_keeps_the_run(pb8, tmp_path, monkeypatch):
    from memcli.core.errors import UserError
    from memcli.training import trainer  # the exporter as the loop calls it

    def failing(*args, **kwargs):
        raise UserError("exporter says no")
    monkeypatch.setattr(trainer, "export_adapter", failing)
    run = tmp_path / "run"
    result = run_cli("train", pb8, "--out", run, "--model", "tiny", "--max-steps", "1", "--gguf", "require")
    assert result.exit_code == 2 and "exporter says no" in result.stderr
    assert json.loads((run / "summary.json").read_text())["gguf_error"] == "exporter says no"
    assert (run / "adapter" / "adapter_config.json").exists()


# --- resume compares resolved settings (issue 8, item 4) ---------------------------------------------------------

def test_setting_differences_compare_resolved_values(monkeypatch):
    import dataclasses

    from memcli.training.config import setting_differences

    def saved(**kw):  # a config.yaml's settings, as a run started with these options recorded them
        return dataclasses.asdict(TrainConfig(corpus="c.jsonl", **kw))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert setting_differences(saved(device="auto"), TrainConfig(corpus="c.jsonl", device="cpu")) == []
    assert setting_differences(saved(device="auto", dtype="auto"),
                               TrainConfig(corpus="c.jsonl", device="cpu", dtype="float32")) == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert setting_differences(saved(device="auto"), TrainConfig(corpus="c.jsonl", device="cuda:0")) == []
    assert setting_differences(saved(device="cuda"), TrainConfig(corpus="c.jsonl", device="cuda:0")) == []
    assert setting_differences(saved(device="auto"), TrainConfig(corpus="c.jsonl", device="cpu")) == \
        [("device", "auto", "cpu")]
    assert setting_differences(saved(device="auto"), TrainConfig(corpus="c.jsonl", device="cuda:1")) == \
        [("device", "auto", "cuda:1")]
    # alpha unset means alpha = rank; output-only settings never count; a setting the file lacks is its default.
    assert setting_differences(saved(rank=4), TrainConfig(corpus="c.jsonl", rank=4, alpha=4.0, gguf="off")) == []
    old = saved()
    del old["gguf"]
    assert setting_differences(old, TrainConfig(corpus="c.jsonl")) == []
    assert setting_differences(saved(lr=1e-2, method="sft"), TrainConfig(corpus="c.jsonl", lr=2e-2)) == \
        [("method", "sft", "memft-ot"), ("lr", 1e-2, 2e-2)]


def test_resume_accepts_a_resolved_device_and_names_a_changed_setting(pb8, tmp_path):
    settings = dict(corpus=str(pb8), model="tiny", max_steps=4, checkpoint_every=2, check_every=2, device="auto")

    def interrupt_at_3(step, total, row):
        if step == 3:
            raise Interrupt
    with pytest.raises(Interrupt):
        Trainer(TrainConfig(**settings), tmp_path / "run", log=lambda m: None).run(interrupt_at_3)
    base = ["train", pb8, "--out", tmp_path / "run", "--model", "tiny", "--max-steps", "4", "--checkpoint-every",
            "2", "--check-every", "2", "--resume"]
    result = run_cli(*base, "--lr", "0.02")
    assert result.exit_code == 2
    assert "--lr 0.01 -> 0.02" in " ".join(result.stderr.split())
    device = "cuda:0" if torch.cuda.is_available() else "cpu"  # what auto resolved to
    result = run_cli(*base, "--device", device)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 4


def test_example_config_lists_every_setting_with_its_default():
    """examples/train.yaml documents every train setting (all but the corpus) with the default TrainConfig has."""
    import dataclasses
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "train.yaml"
    listed = yaml.safe_load(path.read_text())
    settings = {f.name for f in dataclasses.fields(TrainConfig)} - {"corpus"}
    assert set(listed) == settings
    assert TrainConfig.from_sources(path, {"corpus": "c.jsonl"}) == TrainConfig(corpus="c.jsonl")


@pytest.mark.slow  # trains two runs
def test_frozen_prefix_training_equals_full_forward_training(pb8, tmp_path, monkeypatch):
    """Starting every step at the first adapted layer (the frozen layers' output computed once) trains the same
    adapter as running the whole model every step."""
    settings = dict(corpus=str(pb8), model="tiny", max_steps=6, check_every=3, batch_size=3, seed=1)
    cached = Trainer(TrainConfig(**settings), tmp_path / "cached", log=lambda m: None)
    with_prefix = cached.run()
    assert cached.prefix is not None and cached.prefix.first_layer == 2  # tiny: 4 layers, adapter on layer 2

    monkeypatch.setattr(Trainer, "frozen_prefix", lambda self: None)
    full = Trainer(TrainConfig(**settings), tmp_path / "full", log=lambda m: None)
    without = full.run()
    assert full.prefix is None
    for key in ("l_init", "l_final", "exact_match", "certified"):
        assert with_prefix[key] == pytest.approx(without[key], rel=1e-6, abs=1e-7), key

    def rows(run):
        return [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows("cached"), rows("full"), strict=True):
        assert a["objective"] == pytest.approx(b["objective"], rel=1e-6), a["step"]
    for name, p in cached.model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p, dict(full.model.named_parameters())[name], atol=1e-6), name


def test_no_prefix_when_the_adapter_starts_at_layer_0(pb8, tmp_path):
    trainer = Trainer(TrainConfig(corpus=str(pb8), model="tiny", layers=[0, 2], max_steps=1), tmp_path / "r",
                      log=lambda m: None)
    trainer.run()
    assert trainer.prefix is None
