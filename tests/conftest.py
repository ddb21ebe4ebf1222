import json
import shutil
from pathlib import Path

import pytest
from helpers import PARTLY_TRAINED


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from memcli.core import models

    return models.load_tokenizer(models.resolve("tiny"))


@pytest.fixture(scope="session")
def pb8(tmp_path_factory) -> Path:
    """8 generated PhoneBook entries."""
    from memcli.core.datagen import generate_phonebook

    path = tmp_path_factory.mktemp("corpus") / "pb8.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in generate_phonebook(8, seed=0)))
    return path


# --- the tiny model, briefly trained (test_verify.py, test_verify_stream.py) -------------------------------

@pytest.fixture(scope="module")
def tiny_run(pb8, tmp_path_factory):
    """A tiny run trained for a few steps on pb8: some entries recalled, some not (5 of 8 exact, 2 certified)."""
    import torch

    from memcli.training.config import TrainConfig
    from memcli.training.trainer import Trainer

    run = tmp_path_factory.mktemp("verify") / "run"
    cfg = TrainConfig(corpus=str(pb8), model="tiny", **PARTLY_TRAINED)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is as fast, and immune to a busy machine's other work
    try:
        Trainer(cfg, run, log=lambda m: None).run()
    finally:
        torch.set_num_threads(threads)
    return run


@pytest.fixture(scope="module")
def tiny_gguf(tiny_run, tmp_path_factory):
    """The run's adapter GGUF on its own (no run folder beside it)."""
    from memcli.gguf.adapter import export_adapter

    path = tmp_path_factory.mktemp("gguf") / "adapter.gguf"
    if (tiny_run / "adapter.gguf").exists():  # train writes it
        shutil.copy(tiny_run / "adapter.gguf", path)
    else:
        export_adapter(tiny_run, path)
    return path
