"""One process at a time in a run folder: memcli run as users run it, in separate processes that are started
together, killed (SIGKILL) and resumed for real."""

import json
import signal
import subprocess
import sys

import pytest
from helpers import ONE_THREAD, run_memcli, start_memcli, wait_for

from memcli.core.errors import UserError
from memcli.core.runs import RunLock

HOLD = ("import sys, time\nfrom memcli.core.runs import RunLock\nlock = RunLock(sys.argv[1])\n"
        "print('held', flush=True)\ntime.sleep(600)\n")



def test_a_held_lock_names_its_holder_and_a_killed_holder_blocks_nothing(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UserError, match=rf"run folder .*run is in use by another memcli process "
                                            rf"\(pid {holder.pid}, started "):
            RunLock(run)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock_file = tmp_path / "run.lock"
    assert json.loads(lock_file.read_text())["pid"] == holder.pid  # the killed holder's file is still there
    with RunLock(run):  # ... and blocks nothing: the kernel let go of its lock when it died
        assert json.loads(lock_file.read_text())["pid"] != holder.pid
    assert not lock_file.exists()


def test_a_lock_for_a_new_nested_folder_leaves_nothing_when_released(tmp_path):
    with RunLock(tmp_path / "a" / "b" / "run"):
        assert (tmp_path / "a" / "b" / "run.lock").is_file()
    assert list(tmp_path.iterdir()) == []


def train_args(run, corpus, steps, *more):
    return ("train", corpus, "--out", run, "--model", "tiny", "--max-steps", steps, "--check-every", 1000,
            "--gguf", "off", *more)


@pytest.mark.slow
def test_two_trainings_started_together_into_one_folder(pb8, tmp_path):
    run = tmp_path / "run"
    procs = [start_memcli(*train_args(run, pb8, 60), **ONE_THREAD) for _ in range(2)]
    ended = [(p, *p.communicate(timeout=900)) for p in procs]
    assert sorted(p.returncode for p, _, _ in ended) == [0, 2], [err[-2000:] for _, _, err in ended]
    (winner, _, _), (_, _, refused) = sorted(ended, key=lambda e: e[0].returncode)
    lines = refused.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: run folder"), refused
    assert f"in use by another memcli process (pid {winner.pid}, started " in lines[0]
    assert json.loads((run / "summary.json").read_text())["steps"] == 60
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # the lock file went with its holder


@pytest.mark.slow
def test_a_killed_training_resumes(pb8, tmp_path):
    run = tmp_path / "run"
    args = train_args(run, pb8, 12, "--checkpoint-every", 2)
    proc = start_memcli(*args, **ONE_THREAD)
    wait_for(lambda: any((run / "checkpoints").glob("step-*.pt")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert (tmp_path / "run.lock").exists() and not (run / "summary.json").exists()  # what the kill left

    resumed = run_memcli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["stop_reason"] == "budget"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
