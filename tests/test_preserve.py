"""memcli train --preserve: the KL term to the frozen base (the same model, adapter off) on replay text."""

import json

import pytest
import torch
from helpers import assert_refused, run_cli

from memcli.training.config import TrainConfig
from memcli.training.trainer import Trainer


def train(pb8, out, **settings):
    cfg = TrainConfig(corpus=str(pb8), model="tiny", check_every=1000, gguf="off", **settings)
    return Trainer(cfg, out, log=lambda m: None).run()


def test_preserve_term_is_zero_for_the_base_and_the_full_kl_when_topk_holds_everything(pb8, tmp_path, monkeypatch):
    """At initialisation (LoRA's B = 0) the tuned model is the base: the term is 0. With TOP_K = the vocabulary the
    coarsened KL is the full KL(base || tuned), computed here directly from the two models' logits."""
    from memcli.training import forward, preserve
    from memcli.training.locality import as_examples

    monkeypatch.setattr(preserve, "TOP_K", 49152)  # tiny has SmolLM2's vocabulary
    trainer = Trainer(TrainConfig(corpus=str(pb8), model="tiny", preserve=True, preserve_weight=1.0, dropout=0.0,
                                  gguf="off"),
                      tmp_path / "run", log=lambda m: None)
    trainer.replay = trainer.replay[:2]  # the full vocabulary per position: keep the replay text small
    term = trainer.preserve_term()
    assert term.loss(trainer.model, 1).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():  # move the adapter: B = 0.05
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    trainer.model.eval()
    got = term.loss(trainer.model, 3).item()
    idx, pos = term.pick(3)
    batch = forward.collate([as_examples(trainer.replay)[i] for i in idx], 0, "cpu")
    with torch.no_grad():
        q = torch.log_softmax(forward.answer_logits(trainer.model, batch), -1)
        with trainer.model.disable_adapter():
            p = torch.log_softmax(forward.answer_logits(trainer.model, batch), -1)
    rows = torch.arange(len(idx)).unsqueeze(1)
    p, q = p[rows, pos], q[rows, pos]
    want = (p.exp() * (p - q)).sum(-1).mean().item()
    assert want > 1e-3
    assert got == pytest.approx(want, rel=1e-3)


@pytest.mark.slow
def test_preserve_keeps_the_model_closer_to_the_base(pb8, tmp_path):
    """Same corpus, seed and steps: with --preserve the KL(base || tuned) train records on the reference is lower."""
    plain = train(pb8, tmp_path / "plain", max_steps=30, lr=0.05)
    kept = train(pb8, tmp_path / "kept", max_steps=30, lr=0.05, preserve=True, preserve_weight=5.0)
    assert kept["locality"]["kl"] < 0.5 * plain["locality"]["kl"], (kept["locality"], plain["locality"])
    metrics = [json.loads(line) for line in (tmp_path / "kept" / "metrics.jsonl").read_text().splitlines()]
    assert all("preserve" in row for row in metrics if "objective" in row)


@pytest.mark.slow
def test_preserve_resumes_where_an_uninterrupted_run_ends(pb8, tmp_path):
    whole = train(pb8, tmp_path / "whole", max_steps=8, preserve=True, checkpoint_every=4)
    cfg = TrainConfig(corpus=str(pb8), model="tiny", check_every=1000, gguf="off", max_steps=8, preserve=True,
                      checkpoint_every=4)
    part = Trainer(cfg, tmp_path / "part", log=lambda m: None)
    batches = part.batches
    part.batches = lambda: (b for b in batches() if b[0] <= 4)  # stop after step 4, as an interruption would
    part.run()
    (tmp_path / "part" / "summary.json").unlink()
    resumed = Trainer(cfg, tmp_path / "part", resume=True, log=lambda m: None).run()
    assert resumed["l_final"] == pytest.approx(whole["l_final"], abs=1e-6)
    assert resumed["locality"]["kl"] == pytest.approx(whole["locality"]["kl"], abs=1e-7)


@pytest.mark.parametrize("case", ["without-preserve", "short", "missing"])
def test_bad_preserve_text_exits_2_and_leaves_no_run_folder(pb8, tmp_path, case):
    text = tmp_path / "t.txt"
    text.write_text("Too short." if case != "missing" else "")
    if case == "missing":
        text.unlink()
    args = ["train", pb8, "--model", "tiny", "--out", tmp_path / "run", "--max-steps", "1", "--preserve-text", text]
    if case != "without-preserve":
        args.append("--preserve")
    needle = {"without-preserve": "add --preserve", "short": "shorter than one window",
              "missing": "no such file"}[case]
    assert_refused(run_cli(*args), "--preserve-text", needle)
    assert not (tmp_path / "run").exists()
