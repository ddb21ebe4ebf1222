import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA = Path(__file__).resolve().parent / "data"  # small copies of the shared formats, always present


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from memcli import models

    return models.load_tokenizer(models.resolve("tiny"))


@pytest.fixture(scope="session")
def pb8(tmp_path_factory) -> Path:
    """8 generated PhoneBook entries."""
    from memcli.datagen import generate_phonebook

    path = tmp_path_factory.mktemp("corpus") / "pb8.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in generate_phonebook(8, seed=0)))
    return path


def run_cli(*args):
    """memcli in-process (fast); returns click's Result with exit_code, stdout and stderr."""
    from memcli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def run_memcli(*args, timeout=600) -> subprocess.CompletedProcess:
    """memcli as a user runs it: a separate process."""
    return subprocess.run([sys.executable, "-m", "memcli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def start_memcli(*args, **env) -> subprocess.Popen:
    """memcli started as a separate process and left running (stdout and stderr piped as text); `env` adds
    environment variables."""
    import os

    import signal

    def default_sigint():  # a test run started in the background inherits SIGINT ignored; a user's shell does not
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    return subprocess.Popen([sys.executable, "-m", "memcli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env}, preexec_fn=default_sigint)
