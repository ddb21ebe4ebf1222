"""`memcli sweep` on the tiny model, end to end into `memcli fit` and `memcli plan`."""

import json

import pytest
import yaml
from helpers import run_cli


@pytest.mark.slow  # trains a grid of cells, twice
def test_sweep_fits_end_to_end_and_resumes(tmp_path):
    corpus = tmp_path / "random.jsonl"
    assert run_cli("data", "random", "--tokens", "48", "--model", "tiny", "--out", corpus).exit_code == 0
    sweep = tmp_path / "sweep"
    args = ["sweep", corpus, "--ranks", "1,2,4", "--answer-tokens", "12,24,48", "--out", sweep, "--model", "tiny",
            "--method", "sft", "--max-steps", "4", "--batch-size", "1", "--check-every", "4"]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    cells = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert cells == sorted(f"rank{r}-l{n}" for r in (1, 2, 4) for n in (12, 24, 48))
    summary = json.loads((sweep / "rank2-l24" / "summary.json").read_text())
    assert (summary["rank"], summary["answer_tokens"], summary["method"], summary["steps"]) == (2, 24, "sft", 4)
    assert (sweep / "rank2-l24" / "adapter.gguf").exists()

    # Rerunning skips finished cells (their summaries stay byte for byte) and trains a removed one again.
    before = (sweep / "rank1-l12" / "summary.json").read_bytes()
    (sweep / "rank4-l48" / "summary.json").unlink()
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert (sweep / "rank1-l12" / "summary.json").read_bytes() == before
    assert json.loads((sweep / "rank4-l48" / "summary.json").read_text())["rank"] == 4

    law = tmp_path / "law.json"
    result = run_cli("fit", sweep, "--out", law, "--n-boot", "20")
    assert result.exit_code == 0, result.output
    fitted = json.loads(law.read_text())
    assert fitted["capacity"] == "rank" and len(fitted["used"]) + len(fitted["dropped"]) == 9
    assert (tmp_path / "pred_vs_obs.png").exists() and (tmp_path / "delta_l_vs_l.png").exists()

    # 4 steps recall nothing: the law's rank for 24 tokens lies beyond the ranks measured, refused unless asked
    result = run_cli("plan", "--law", law, "--tokens", "24", "--l-init", "13.5")
    assert result.exit_code == 2 and "above the largest rank its runs measured (4)" in " ".join(result.output.split())
    result = run_cli("plan", "--law", law, "--tokens", "24", "--l-init", "13.5", "--extrapolate")
    assert result.exit_code == 0, result.output
    held = fitted["extrapolation"]  # the law's own check, as fit computed it, repeated by plan
    if held.get("mape") is not None:
        assert (f"fitted without its longest length (l = {held['held_out_length']:,.0f}), it predicts those "
                f"{held['n_points']} runs with MAPE {held['mape']:.2f} %") in " ".join(result.stdout.split())
    else:
        assert "own check" not in result.stdout

    # plan CORPUS: l counted and L_init measured on the corpus with the plain base model.
    import torch

    from memcli.core import corpus as corpus_mod
    from memcli.core import models
    from memcli.training import forward

    base, tok = models.load_model(models.resolve("tiny"))
    examples = corpus_mod.load_examples(corpus, tok)
    batch = forward.collate(examples, tok.pad_token_id, "cpu")
    with torch.no_grad():
        ce, _, _ = forward.answer_ce(base, batch)
    l_init = (ce.sum() / batch.mask.sum()).item()
    result = run_cli("plan", corpus, "--law", law, "--model", "tiny", "--extrapolate")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert f"for 48 answer tokens starting from L_init {l_init:.3f}" in text, (l_init, text)


def test_sweep_bad_grid_and_missing_ray(tmp_path, pb8):
    result = run_cli("sweep", pb8, "--ranks", "0,2", "--answer-tokens", "20", "--out", tmp_path / "s",
                     "--model", "tiny")
    assert result.exit_code == 2 and "--ranks: every rank must be at least 1" in result.stderr
    try:
        import ray  # noqa: F401
    except ImportError:
        result = run_cli("sweep", pb8, "--ranks", "1", "--answer-tokens", "20", "--out", tmp_path / "s2",
                         "--model", "tiny", "--executor", "ray")
        assert result.exit_code == 2 and "pip install 'memcli[ray]'" in result.stderr


def _small_sweep(tmp_path, *extra):
    corpus = tmp_path / "random.jsonl"
    if not corpus.exists():
        assert run_cli("data", "random", "--tokens", "12", "--model", "tiny", "--out", corpus).exit_code == 0
    return ["sweep", corpus, "--ranks", "1,2", "--answer-tokens", "6", "--out", tmp_path / "sweep", "--model",
            "tiny", "--max-steps", "2", "--batch-size", "1", "--check-every", "2", *extra]


@pytest.mark.slow  # trains a sweep, twice
def test_rerun_with_other_settings_is_refused_and_force_retrains(tmp_path):
    sweep = tmp_path / "sweep"
    assert run_cli(*_small_sweep(tmp_path, "--method", "sft")).exit_code == 0
    before = {p: p.read_bytes() for p in [sweep / "sweep.yaml", *sweep.glob("*/summary.json")]}
    assert len(before) == 3

    result = run_cli(*_small_sweep(tmp_path, "--method", "memft-ot"))
    assert result.exit_code == 2
    error = " ".join(result.stderr.split())
    assert "--method 'sft' -> 'memft-ot'" in error and "--force" in error and "rank1-l6" in error
    assert {p: p.read_bytes() for p in before} == before  # nothing touched, sweep.yaml included

    # Another spelling of the same device is not a change (on this machine auto resolves to it).
    import torch

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    result = run_cli(*_small_sweep(tmp_path, "--method", "sft", "--device", device))
    assert result.exit_code == 0, result.output
    assert {p: p.read_bytes() for p in before if p.name == "summary.json"} == \
        {p: v for p, v in before.items() if p.name == "summary.json"}

    result = run_cli(*_small_sweep(tmp_path, "--method", "memft-ot", "--force"))
    assert result.exit_code == 0, result.output
    for cell in ("rank1-l6", "rank2-l6"):
        assert json.loads((sweep / cell / "summary.json").read_text())["method"] == "memft-ot"
        assert yaml.safe_load((sweep / cell / "config.yaml").read_text())["settings"]["method"] == "memft-ot"
    assert yaml.safe_load((sweep / "sweep.yaml").read_text())["settings"]["method"] == "memft-ot"


@pytest.mark.slow  # trains a sweep
def test_one_cells_failed_export_does_not_stop_the_sweep(tmp_path, monkeypatch):
    from pathlib import Path

    from memcli.training import trainer  # the exporter as the loop calls it

    real = trainer.export_adapter

    def fails_for_rank1(src, out, *args, **kwargs):
        if Path(src).name == "rank1-l6":
            raise RuntimeError("no space left on device")
        return real(src, out, *args, **kwargs)
    monkeypatch.setattr(trainer, "export_adapter", fails_for_rank1)
    result = run_cli(*_small_sweep(tmp_path, "--method", "sft"))
    assert result.exit_code == 0, result.output
    sweep = tmp_path / "sweep"
    failed = json.loads((sweep / "rank1-l6" / "summary.json").read_text())
    assert failed["gguf"] is None and failed["gguf_error"] == "RuntimeError: no space left on device"
    assert (sweep / "rank1-l6" / "adapter" / "adapter_config.json").exists()
    assert json.loads((sweep / "rank2-l6" / "summary.json").read_text())["gguf"] == "adapter.gguf"
    assert (sweep / "rank2-l6" / "adapter.gguf").exists() and not (sweep / "rank1-l6" / "adapter.gguf").exists()


def test_help_texts_keep_their_brackets():
    """Typer renders help with Rich markup, which eats a [word] it takes for a tag ('memcli[ray]'): every help
    text must read as written (brackets escaped as \\[)."""
    import typer
    from rich.text import Text

    from memcli.cli.app import app

    def commands(cmd, path):
        yield path, cmd
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            yield from commands(sub, f"{path} {name}")
    for path, cmd in commands(typer.main.get_command(app), "memcli"):
        for name, text in [("help", cmd.help)] + [(p.name, getattr(p, "help", None)) for p in cmd.params]:
            if text and "[" in text:
                assert Text.from_markup(text).plain == text.replace("\\[", "["), (path, name, text)
    result = run_cli("sweep", "--help")
    assert "memcli[ray]" in " ".join(result.stdout.split())


def test_dead_ray_address_is_refused_at_once():
    """ray.init retries an address nothing listens on for minutes; the sweep says so in one line instead."""
    import socket
    import time

    import pytest

    from memcli.core.errors import UserError
    from memcli.training.sweep import _check_reachable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed
    start = time.monotonic()
    with pytest.raises(UserError, match=f"RAY_ADDRESS=127.0.0.1:{port}: no Ray cluster answers there"):
        _check_reachable(f"127.0.0.1:{port}")
    assert time.monotonic() - start < 10
    _check_reachable(None)
    _check_reachable("auto")


def test_sweep_yaml_records_every_grid_run_in_the_folder(tmp_path, monkeypatch):
    """sweep.yaml describes the folder: a rerun with part of the grid, or another process sweeping more of it with
    the same settings, adds its ranks and lengths; other settings (retrained with --force) start the record over."""
    from pathlib import Path

    from memcli.training import sweep as sweep_mod
    from memcli.training.config import TrainConfig

    def fake_cell(settings, run_dir, device=None, threads=None):
        summary = {"all_certified": False, "rank": settings["rank"], "answer_tokens": settings["answer_tokens"],
                   "wall_seconds": 1.0, "l_init": 3.0, "l_final": 1.5, "delta_l": 1.5}
        Path(run_dir).mkdir(parents=True)
        (Path(run_dir) / "config.yaml").write_text(yaml.safe_dump({"settings": settings}))
        (Path(run_dir) / "summary.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(sweep_mod, "run_cell", fake_cell)
    out, base = tmp_path / "sweep", TrainConfig(corpus="unused.jsonl", model="tiny")

    def recorded():
        record = yaml.safe_load((out / "sweep.yaml").read_text())
        return record["ranks"], record["answer_tokens"]

    sweep_mod.run_sweep(base, [1, 2], [10, 20], out)
    sweep_mod.run_sweep(base, [4], [40], out)
    assert recorded() == ([1, 2, 4], [10, 20, 40])
    sweep_mod.run_sweep(base, [1], [10], out)
    assert recorded() == ([1, 2, 4], [10, 20, 40])
    other = TrainConfig(corpus="unused.jsonl", model="tiny", lr=0.02)
    sweep_mod.run_sweep(other, [1], [10], out, force=True)
    assert recorded() == ([1], [10])
