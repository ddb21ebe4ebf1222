"""Bad input found in review (issue 8, item 3): one line, exit code 2, nothing half-written.

Each case runs the command as a user would (the CLI, in-process) and checks the three promises: exit code 2 (never
1, which `verify` keeps for "recall FAIL", and never a traceback), one `error:` line naming the file, line or
setting, and no output file or folder left behind.
"""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import assert_refused, run_cli, run_memcli

from memcli.core import models
from memcli.core.corpus import Example, read_corpus
from memcli.core.errors import UserError
from memcli.training.config import TrainConfig

NOWHERE = "/proc/memcli-cannot-create"  # a folder nobody, root included, can create



def strict_json(text: str):
    """json.loads that refuses NaN and Infinity (Python's json accepts them; JSON does not)."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny_run(pb8, tmp_path_factory):
    """A tiny run of two steps (recall does not matter here), with adapter/ and adapter.gguf."""
    import torch

    from memcli.training.trainer import Trainer

    run = tmp_path_factory.mktemp("bad") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(TrainConfig(corpus=str(pb8), model="tiny", max_steps=2, check_every=1000), run,
                log=lambda m: None).run()
    finally:
        torch.set_num_threads(threads)
    return run


@pytest.fixture(scope="module")
def tiny_hf():
    return models.hf_dir(models.resolve("tiny"))


def copy_model(src, dst):
    """A copy of an HF model folder."""
    shutil.copytree(src, dst)
    return dst


# --- 1. --out where nothing can be created ------------------------------------------------------------------

@pytest.fixture(params=["proc", "under_a_file"])
def bad_parent(request, tmp_path):
    """A parent folder that cannot be created: under /proc, or under a regular file."""
    if request.param == "proc":
        return Path(NOWHERE)
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    return blocker / "sub"


def law_table(path, with_l_final: bool):
    rows = ["rank,length,delta_l" + (",l_final" if with_l_final else "")]
    for r in (1, 2, 4, 8):
        for n in (64, 128, 256, 512):
            d = 30 * r ** 0.4 * n ** -0.3 - 3
            rows.append(f"{r},{n},{d:.6f}" + (f",{12 - d:.6f}" if with_l_final else ""))
    path.write_text("\n".join(rows) + "\n")
    return path


def test_data_out_that_cannot_be_created(bad_parent, tmp_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    out = bad_parent / "pb.jsonl"
    assert_refused(run_cli("data", "phonebook", "--entries", "3", "--out", out), str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_data_out_that_cannot_be_created_as_a_process():
    result = run_memcli("data", "phonebook", "--entries", "3", "--out", f"{NOWHERE}/pb.jsonl", timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [ln for ln in result.stderr.splitlines() if ln.strip()][0].startswith("error:")
    assert f"{NOWHERE}/pb.jsonl" in result.stderr


@pytest.mark.slow  # trains
def test_train_out_that_cannot_be_created(pb8, bad_parent, tmp_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    out = bad_parent / "run"
    assert_refused(run_cli("train", pb8, "--out", out, "--model", "tiny", "--max-steps", "1"), str(out),
                   "cannot create the run folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_export_out_that_cannot_be_created(tiny_run, bad_parent, tmp_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    out = bad_parent / "adapter.gguf"
    assert_refused(run_cli("export", tiny_run, "--out", out), str(out))
    assert_refused(run_cli("export-base", "tiny", "--out", out), str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_verify_out_that_cannot_be_created(tiny_run, pb8, bad_parent, tmp_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    out = bad_parent / "verify"
    assert_refused(run_cli("verify", pb8, "--lora", tiny_run, "--out", out, "--threads", "1", "--min-exact", "0"),
                   str(out), "cannot create the report folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_fit_out_that_cannot_be_created(bad_parent, tmp_path):
    table = law_table(tmp_path / "runs.csv", with_l_final=True)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = bad_parent / "law.json"
    assert_refused(run_cli("fit", table, "--out", out, "--n-boot", "5"), str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_fit_leaves_no_plots_when_the_law_cannot_be_written(tmp_path, monkeypatch):
    import memcli.commands.law.fit

    def disk_full(law, path):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(memcli.commands.law.fit, "save_law", disk_full)
    table = law_table(tmp_path / "runs.csv", with_l_final=True)
    out = tmp_path / "out" / "law.json"
    assert_refused(run_cli("fit", table, "--out", out, "--n-boot", "5"), str(out), "No space left on device")
    assert list((tmp_path / "out").iterdir()) == []  # the plots written before it are gone again


# --- 2. one key, two values ---------------------------------------------------------------------------------

CONFLICT = [{"query": "Ada:", "target": "6111111111"}, {"query": "Bo:", "target": "7222222222"},
            {"query": "Ada:", "target": "8333333333"}, {"query": "Bo:", "target": "7222222222"}]


def test_identical_duplicates_are_fine_and_conflicts_name_both_lines(tmp_path):
    same = write_jsonl(tmp_path / "same.jsonl", [CONFLICT[1], CONFLICT[0], CONFLICT[1]])
    assert len(read_corpus(same)) == 3
    path = write_jsonl(tmp_path / "c.jsonl", CONFLICT)
    with pytest.raises(UserError, match=r"c\.jsonl:1 and .*c\.jsonl:3: the key 'Ada:' has two different values"):
        read_corpus(path)
    assert len(read_corpus(path, allow_conflicting_keys=True)) == 4


@pytest.mark.slow  # trains and verifies
def test_train_and_verify_refuse_conflicting_keys_unless_allowed(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", CONFLICT)
    run = tmp_path / "run"
    assert_refused(run_cli("train", path, "--out", run, "--model", "tiny", "--max-steps", "1"),
                   "c.jsonl:1 and", "c.jsonl:3", "'Ada:'", "--allow-conflicting-keys")
    assert not run.exists()
    out = tmp_path / "v"
    assert_refused(run_cli("verify", path, "--model", "tiny", "--out", out, "--threads", "1"), "c.jsonl:3")
    assert not out.exists()

    result = run_cli("train", path, "--out", run, "--model", "tiny", "--max-steps", "1", "--allow-conflicting-keys")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((run / "config.yaml").read_text())["settings"]["allow_conflicting_keys"] is True
    # verify follows the run's setting, or the option
    result = run_cli("verify", path, "--lora", run, "--out", out, "--threads", "1", "--min-exact", "0")
    assert result.exit_code == 0, result.output
    result = run_cli("verify", path, "--model", "tiny", "--out", tmp_path / "v2", "--threads", "1",
                     "--min-exact", "0", "--allow-conflicting-keys")
    assert result.exit_code == 0, result.output
    assert strict_json((tmp_path / "v2" / "report.json").read_text())["totals"]["entries"] == 4


# --- 3. mistyped settings -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ('rank: "x"', "setting 'rank' must be an integer, got 'x'"),
    ("rank: 2.5", "setting 'rank' must be an integer"),
    ("modules: 5", "setting 'modules' must be a list of strings"),
    ("layers: [1, a]", "setting 'layers' must be a list of integers"),
    ("lr: fast", "setting 'lr' must be a number, got 'fast'"),
    ("lr: .nan", "setting 'lr' must be a finite number"),
    ("until-recall: maybe", "setting 'until-recall' must be true or false"),
    ("key: 5", "setting 'key' must be a string"),
    ("rank:", "setting 'rank' must be an integer, got None"),
    ("curriculum-epochs: 40,20", "--curriculum-epochs must be increasing positive integers"),
    ("curriculum-epochs: [0, 10]", "--curriculum-epochs must be increasing positive integers"),
    ("rank: [", "cannot be read"),
])
def test_mistyped_yaml_settings_are_refused(pb8, tmp_path, text, message):
    config = tmp_path / "train.yaml"
    config.write_text(text + "\n")
    run = tmp_path / "run"
    assert_refused(run_cli("train", pb8, "--out", run, "--model", "tiny", "--config", config), message)
    assert not run.exists()


@pytest.mark.parametrize("value, message", [
    ("20,x", "--curriculum-epochs takes comma-separated integers"),
    ("40,20", "--curriculum-epochs must be increasing positive integers"),
    ("0,10", "--curriculum-epochs must be increasing positive integers"),
    ("20,20", "--curriculum-epochs must be increasing positive integers"),
])
def test_curriculum_epochs_garbage_is_refused(pb8, tmp_path, value, message):
    run = tmp_path / "run"
    assert_refused(run_cli("train", pb8, "--out", run, "--model", "tiny", "--method", "memft-sw",
                           "--curriculum-epochs", value), message)
    assert not run.exists()


def test_kind_spellings_of_settings_are_accepted(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("layers: 3\nmodules: gate_proj, up_proj\nlr: 1e-3\nrank: '4'\nepochs: 10.0\n"
                      "curriculum_epochs: [5, 10]\nalpha: 8\n")
    cfg = TrainConfig.from_sources(config, {"corpus": "c.jsonl"})
    assert (cfg.layers, cfg.modules, cfg.lr, cfg.rank, cfg.epochs) == ([3], ["gate_proj", "up_proj"], 1e-3, 4, 10)
    assert cfg.curriculum_epochs == [5, 10] and cfg.alpha == 8.0 and isinstance(cfg.alpha, float)


# --- 4. a corrupt run folder on --resume --------------------------------------------------------------------

@pytest.fixture
def finished_run(pb8, tmp_path):
    run = tmp_path / "run"
    args = ["train", pb8, "--out", run, "--model", "tiny", "--max-steps", "2", "--checkpoint-every", "1"]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    return run, args


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("text, message", [
    ("settings: [\n", "config.yaml is corrupt"),
    ("just words\n", "config.yaml is corrupt (no 'settings' mapping)"),
])
@pytest.mark.slow  # trains a run per case
def test_corrupt_config_yaml_on_resume(finished_run, text, message):
    run, args = finished_run
    (run / "config.yaml").write_text(text)
    before = snapshot(run)
    assert_refused(run_cli(*args, "--resume"), message, "--force")
    assert snapshot(run) == before


@pytest.mark.slow  # trains a run per case
@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign"])
def test_corrupt_checkpoint_on_resume(finished_run, damage):
    import torch

    run, args = finished_run
    newest = sorted((run / "checkpoints").glob("step-*.pt"))[-1]
    if damage == "truncated":
        newest.write_bytes(newest.read_bytes()[:200])
    elif damage == "garbage":
        newest.write_bytes(b"not a checkpoint at all")
    else:
        torch.save({"step": 2, "adapter": {"some.other.weight": torch.zeros(2)}}, newest)
    before = snapshot(run)
    assert_refused(run_cli(*args, "--resume"), f"checkpoint {newest} is corrupt or not from this run")
    assert snapshot(run) == before


# --- 5. token ids outside the base's vocabulary -------------------------------------------------------------

def test_prompt_ids_outside_the_vocabulary_are_refused_by_both_backends(tiny_run):
    from memcli.commands.verify.peft_backend import TorchBackend
    from memcli.gguf.base import base_gguf
    from memcli.llama.scorer import LlamaBackend

    spec = models.resolve("tiny")
    n_vocab = 49152
    good = Example((1, 2, 3), (4, 5), 1)
    bad = Example((1, n_vocab + 7, 3), (4, 5), 2)  # the prompt's id, the targets are fine
    llama = LlamaBackend(base_gguf(spec), threads=1)
    try:
        with pytest.raises(UserError, match=rf"corpus line 2: token id {n_vocab + 7} is outside the vocabulary"):
            llama.open([good, bad], 64)
    finally:
        llama.close()
    torch_backend = TorchBackend(spec, tiny_run / "adapter", device="cpu", threads=1)
    with pytest.raises(UserError, match=rf"corpus line 2: token id {n_vocab + 7} is outside the vocabulary"):
        torch_backend.open([good, bad], 64)


def test_verify_refuses_a_tokenizer_with_ids_beyond_the_model(tiny_hf, tmp_path):
    """A model folder whose tokenizer has an added token past the model's vocabulary: the key's special token
    becomes a prompt id the model has no embedding for. Today a refusal, not a crash or a recall FAIL."""
    folder = copy_model(tiny_hf, tmp_path / "model")
    tok = json.loads((folder / "tokenizer.json").read_text())
    n_vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    tok["added_tokens"].append({"id": n_vocab, "content": "<|extra|>", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True})
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"query": "Ada:", "target": "6111111111"},
                                                {"query": "<|extra|> Bo:", "target": "7222222222"}])
    out = tmp_path / "v"
    assert_refused(run_cli("verify", corpus, "--model", folder, "--backend", "torch", "--out", out, "--threads", "1"),
                   "corpus line 2", f"token id {n_vocab} is outside the vocabulary")
    assert not out.exists()


# --- 6. NaN and infinities in the report ---------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "llama"])
def test_report_stays_valid_json_when_the_model_gives_nan(tiny_run, pb8, tmp_path, backend):
    from safetensors.torch import load_file, save_file

    peft = tmp_path / "nan-adapter"
    shutil.copytree(tiny_run / "adapter", peft)
    weights = load_file(peft / "adapter_model.safetensors")
    for name in weights:
        if "lora_B" in name:
            weights[name].fill_(float("nan"))
    save_file(weights, peft / "adapter_model.safetensors")
    out = tmp_path / "v"
    result = run_cli("verify", pb8, "--lora", peft, "--out", out, "--threads", "1", "--backend", backend)
    assert result.exit_code == 1, result.output  # every entry fails: a recall FAIL, not bad input
    report = strict_json((out / "report.json").read_text())
    totals = report["totals"]
    assert totals["non_finite_entries"] == 8 and totals["non_finite_lines"] == list(range(1, 9))
    assert totals["mean_ce"] is None and totals["exact"] == 0
    rows = [strict_json(line) for line in (out / "entries.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["min_p"] is None and r["mean_ce"] is None for r in rows)


def test_report_json_writer_nulls_every_non_finite_float(tmp_path):
    from memcli.commands.verify.report import ReportWriter
    from memcli.core.runs import json_safe

    writer = ReportWriter(tmp_path / "r")
    writer.entry({"a": math.inf, "b": [np.float32("nan"), 1.5]})
    writer.commit({"totals": {"x": -math.inf, "y": np.float64(2.0)}}, None, "t")
    assert strict_json((tmp_path / "r" / "report.json").read_text()) == {"totals": {"x": None, "y": 2.0}}
    assert strict_json((tmp_path / "r" / "entries.jsonl").read_text()) == {"a": None, "b": [None, 1.5]}
    assert json_safe((1, {"k": math.nan})) == [1, {"k": None}]


# --- 7. fit without l_final -------------------------------------------------------------------------------

def test_fit_says_when_the_saturation_rule_cannot_be_applied(tmp_path):
    out = tmp_path / "law.json"
    result = run_cli("fit", law_table(tmp_path / "runs.csv", with_l_final=False), "--out", out, "--n-boot", "5",
                     "--no-plots")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "saturation rule" in text and "could not be applied to 16 of 16 runs" in text
    notes = strict_json(out.read_text())["notes"]
    assert len(notes) == 1 and "no l_final" in notes[0]
    result = run_cli("fit", law_table(tmp_path / "full.csv", with_l_final=True), "--out", out, "--n-boot", "5",
                     "--no-plots")
    assert result.exit_code == 0 and "saturation rule" not in result.stdout
    assert strict_json(out.read_text())["notes"] == []


# --- 8. the base of a bare PEFT folder, and the torch backend's fingerprint check ----------------------------

@pytest.mark.parametrize("recorded", ["/nowhere/some-model", None])
def test_bare_peft_folder_with_an_unknown_base_needs_model(tiny_run, pb8, tmp_path, recorded):
    peft = tmp_path / "peft"
    shutil.copytree(tiny_run / "adapter", peft)
    config = json.loads((peft / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = recorded
    (peft / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "v"
    for backend in ("llama", "torch"):
        assert_refused(run_cli("verify", pb8, "--lora", peft, "--out", out, "--backend", backend, "--threads", "1"),
                       f"--lora {peft}", "pass --model")
        assert not out.exists()
    result = run_cli("verify", pb8, "--lora", peft, "--model", "tiny", "--out", out, "--threads", "1",
                     "--min-exact", "0")
    assert result.exit_code == 0, result.output
    assert strict_json((out / "report.json").read_text())["settings"]["model"] == "tiny"


@pytest.fixture(scope="module")
def other_tiny(tiny_hf, tmp_path_factory):
    """tiny's architecture, vocabulary and shapes with one norm weight changed: another base."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("other") / "model"
    shutil.copytree(tiny_hf, folder)
    weights = load_file(folder / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 0.5
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_torch_backend_refuses_another_base(tiny_run, pb8, other_tiny, tmp_path):
    out = tmp_path / "v"
    for lora in (tiny_run, tiny_run / "adapter"):  # the run (adapter.gguf's record), the run's PEFT folder
        assert_refused(run_cli("verify", pb8, "--lora", lora, "--model", other_tiny, "--backend", "torch",
                               "--out", out, "--threads", "1"), "was trained for tiny", "is another model")
        assert not out.exists()


def test_a_bare_peft_folder_on_another_base_is_refused(tiny_run, pb8, other_tiny, tmp_path):
    peft = tmp_path / "peft"
    shutil.copytree(tiny_run / "adapter", peft)  # names tiny's cache folder as its base
    out = tmp_path / "v"
    for backend in ("torch", "llama"):
        assert_refused(run_cli("verify", pb8, "--lora", peft, "--model", other_tiny, "--backend", backend,
                               "--out", out, "--threads", "1"), "was trained for tiny")
        assert not out.exists()


def test_gemma3_with_vision_is_refused_in_one_line(tmp_path):
    """A Gemma 3 with vision (model_type gemma3) is refused naming the text-only family memcli supports."""
    from memcli.core import models
    from memcli.core.errors import UserError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    with pytest.raises(UserError, match="Gemma 3 with vision.*gemma3_text"):
        models.resolve(str(tmp_path))


def test_ask_with_an_empty_prompt_on_a_model_without_bos_is_refused():
    """An empty key on a model that adds no BOS (SmolLM2's vocabulary) leaves nothing to complete from."""
    from memcli.gguf.base import base_gguf

    assert_refused(run_cli("ask", base_gguf(models.resolve("tiny")), ""), "the prompt is empty")


def test_a_system_prompt_without_the_chat_template_is_refused(pb8, tmp_path):
    assert_refused(run_cli("train", pb8, "--out", tmp_path / "r", "--model", "tiny", "--system-prompt", "Be brief."),
                   "--system-prompt is the system message of --chat-template")
    assert_refused(run_cli("verify", pb8, "--model", "tiny", "--out", tmp_path / "v", "--system-prompt", "Be brief."),
                   "--system-prompt is the system message of --chat-template")
    assert not (tmp_path / "r").exists() and not (tmp_path / "v").exists()
