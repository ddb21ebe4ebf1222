"""`memcli bench memory`, `memcli bench base`, `memcli bench prefix` on the tiny model: each command's figures
checked against what can be known without it (the corpus it generated, the tokenizer, float32 vs float16)."""

import json

import pytest
from helpers import run_cli

from memcli.commands.bench.phonebook import CAPACITY, write_phonebook
from memcli.core import corpus, models
from memcli.core.datagen import generate_phonebook


def test_generated_phonebooks_beyond_the_generators_names_keep_keys_unique(tmp_path):
    path = tmp_path / "pb.jsonl"
    write_phonebook(path, CAPACITY + 20, seed=3)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == CAPACITY + 20 and len({r["query"] for r in rows}) == CAPACITY + 20
    assert rows[:CAPACITY] == generate_phonebook(CAPACITY, seed=3)
    assert rows[CAPACITY]["query"] == rows[0]["query"][:-1] + " 2:"
    assert all(len(r["target"]) == 10 and r["target"].isdigit() and r["target"][0] in "6789" for r in rows[CAPACITY:])


@pytest.mark.slow  # a benchmark
def test_bench_memory_runs_verify_once_per_size(tmp_path):
    out = tmp_path / "memory.json"
    stub = run_cli("bench", "memory", "--entries", "300,900", "--no-decode", "--threads", "1", "--out", out)
    assert stub.exit_code == 0, stub.output
    result = json.loads(out.read_text())
    rows = result["rows"]
    # each child verified the generated corpus of its size, with llama_decode stubbed
    assert [r["entries"] for r in rows] == [300, 900]
    assert {r["backend"] for r in rows} == {"no decode (memory probe)"}
    assert all(100 < r["peak_rss_mb"] < 4096 for r in rows)  # a Python process with torch loaded, not a leak
    growth = (rows[1]["peak_rss_mb"] - rows[0]["peak_rss_mb"]) * 2**20 / 600
    assert abs(rows[1]["bytes_per_entry_since"] - growth) < 1e-6 and abs(result["bytes_per_entry"] - growth) < 1e-6
    assert abs(growth) < 20_000  # nowhere near what holding the tokenised corpus would cost per entry
    assert "growth from 300 to 900 entries" in stub.stdout

    real = run_cli("bench", "memory", "--entries", "12", "--threads", "1", "--out", out)  # the real decode
    assert real.exit_code == 0, real.output
    (row,) = json.loads(out.read_text())["rows"]
    assert row["entries"] == 12 and row["backend"] == "llama.cpp"
    assert run_cli("bench", "memory", "--entries", "900,300").exit_code == 2


@pytest.mark.slow  # a benchmark
def test_bench_base_compares_f32_and_f16_exports_with_torch(tmp_path):
    out = tmp_path / "base.json"
    result = run_cli("bench", "base", "--model", "tiny", "--entries", "8", "--threads", "1", "--out", out)
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    assert r["entries"] == 8 and r["answer_tokens"] == 80  # 10 digits, one token each
    rows = r["rows"]
    assert set(rows) == {"torch float32", "f32 export (verify's)", "f16 export"}
    f32, f16 = rows["f32 export (verify's)"], rows["f16 export"]
    # llama.cpp on the F32 export is torch's float32 model up to its F16 KV cache; rounding the weights to F16
    # moves the log-probabilities further
    assert f32["max_dlogp"] < 0.05 and f32["argmax_differs"] == 0
    assert f16["mean_dlogp"] > f32["mean_dlogp"] > 0
    assert f32["gguf"] != f16["gguf"]


@pytest.mark.slow  # a benchmark
def test_bench_prefix_saves_the_shared_prompt_prefix_without_changing_verdicts(tmp_path, tiny_tokenizer):
    out = tmp_path / "prefix.json"
    result = run_cli("bench", "prefix", "--model", "tiny", "--entries", "8", "--threads", "1", "--rounds", "1",
                     "--out", out)
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    path = tmp_path / "pb.jsonl"
    write_phonebook(path, 8)  # the corpus the command generated
    examples = corpus.load_examples(path, tiny_tokenizer, chat_template=True)
    first = examples[0].prompt_ids
    prefix = min(next((i for i, (a, b) in enumerate(zip(first, ex.prompt_ids)) if a != b), len(first))
                 for ex in examples[1:])
    assert prefix >= 10 and r["model"] == models.resolve("tiny").name
    # the 8 entries fit one batch: the prefix is decoded once instead of 8 times
    assert r["shared_prefix_tokens_saved"] == prefix * 7
    assert r["tokens"] == sum(len(ex) for ex in examples)
    assert r["verdicts_identical"] == 8 and r["max_abs_dp"] < 1e-3
    assert run_cli("bench", "prefix", "--model", "tiny", "--entries", "1").exit_code == 2
