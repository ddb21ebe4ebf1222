"""SIGTERM unwinds like Ctrl-C: memcli stopped for real, in a separate process, mid-write. Nothing temporary
is left, an earlier output stays whole, and the exit code is the shell's (130 for SIGINT, 143 for SIGTERM)."""

import json
import signal
import subprocess
import sys

import pytest
from helpers import ONE_THREAD, run_cli, start_memcli, wait_for

WRITE_SLOWLY = """
import sys, time
from memcli.core import runs
from memcli.core.signals import handle_sigterm

handle_sigterm()

def write(tmp):
    with open(tmp, "w") as f:
        f.write("half")
        f.flush()
        print("writing", flush=True)
        time.sleep(600)

try:
    runs.atomic_write(sys.argv[1], write)
except KeyboardInterrupt as e:
    print(type(e).__name__, flush=True)
    sys.exit(143)
"""


def test_sigterm_mid_atomic_write_keeps_the_old_file_and_no_temporary(tmp_path):
    """The writer export, train's checkpoints and every other output go through."""
    target = tmp_path / "out.gguf"
    target.write_text("the earlier output")
    proc = subprocess.Popen([sys.executable, "-c", WRITE_SLOWLY, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "writing\n"
    assert len(list(tmp_path.iterdir())) == 2  # the temporary file is there
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert (proc.returncode, out) == (143, "Terminated\n")
    assert [p.name for p in tmp_path.iterdir()] == ["out.gguf"]
    assert target.read_text() == "the earlier output"


@pytest.fixture(scope="module")
def pb3000(tmp_path_factory):
    from memcli.core.datagen import generate_phonebook

    path = tmp_path_factory.mktemp("corpus") / "pb3000.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in generate_phonebook(3000, seed=1)))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")],
                         ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_verify_keeps_the_previous_report(sig, code, name, pb8, pb3000, tmp_path):
    out = tmp_path / "report"
    common = ("--model", "tiny", "--out", out, "--threads", "1", "--min-exact", "0")
    first = run_cli("verify", pb8, *common)
    assert first.exit_code == 0, first.output
    before = (out / "report.json").read_bytes()

    proc = start_memcli("verify", pb3000, *common)
    wait_for(lambda: any(f.stat().st_size for f in tmp_path.glob(".report.*.tmp/entries.jsonl")), proc)
    proc.send_signal(sig)  # mid-pass: entries are being written into the temporary folder
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == f"interrupted by {name}" + (" (Ctrl-C)" if name == "SIGINT" else "")
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no .report.*.tmp
    assert (out / "report.json").read_bytes() == before


@pytest.mark.slow
def test_sigterm_mid_training_leaves_no_temporary_file_and_no_lock(pb8, tmp_path):
    run = tmp_path / "run"
    proc = start_memcli("train", pb8, "--out", run, "--model", "tiny", "--max-steps", 100000, "--check-every",
                        1000, "--checkpoint-every", 1, "--gguf", "off", **ONE_THREAD)
    wait_for(lambda: len(list((run / "checkpoints").glob("step-*.pt"))) >= 2, proc)
    proc.send_signal(signal.SIGTERM)  # a checkpoint is written at every step
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "interrupted by SIGTERM"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # the lock file went
    assert [p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("step-")] == []
    assert not (run / "summary.json").exists()


@pytest.mark.slow
def test_sigterm_to_a_sweep_unwinds_its_worker_processes_too(pb8, tmp_path):
    out = tmp_path / "sweep"
    cells = ["rank1-l10", "rank2-l10"]
    proc = start_memcli("sweep", pb8, "--ranks", "1,2", "--answer-tokens", 10, "--out", out, "--jobs", 2, "--model",
                        "tiny", "--max-steps", 100000, "--check-every", 1000, "--checkpoint-every", 1, "--gguf", "off")
    wait_for(lambda: all(any((out / c / "checkpoints").glob("step-*.pt")) for c in cells), proc)
    proc.send_signal(signal.SIGTERM)  # to the sweep alone, as a job scheduler sends it
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, err
    # no RUN.lock left: each worker released its cell's lock on the way out (a worker killed outright leaves it)
    assert sorted(p.name for p in out.iterdir()) == [*cells, "sweep.yaml"]
    for c in cells:
        assert [p.name for p in (out / c / "checkpoints").iterdir() if not p.name.startswith("step-")] == []
