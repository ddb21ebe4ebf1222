"""`memcli bench methods`' bookkeeping: variants parsed into train settings, bits per parameter by hand, medians
over seeds and the count of seeds a variant matches the baseline in."""

import json
import math

import pytest

from memcli.commands.bench.methods import Regime, bits_per_parameter, first_exact_step, parse_variant, table_rows
from memcli.core.errors import UserError


def test_variants_are_train_settings():
    name, settings = parse_variant("memft-ot  train_threshold=0.9 dropout=0")
    assert name == "memft-ot train_threshold=0.9 dropout=0"
    assert settings == {"method": "memft-ot", "train_threshold": 0.9, "dropout": 0.0}
    assert parse_variant("sft preserve=true")[1] == {"method": "sft", "preserve": True}
    for bad in ("memft-ot preserve=maybe", "memft-ot rank=4", "memft-ot batch_size=4", "memft-ot check_every=2",
                "memft-ot bogus=1", "memft-ot train_threshold", "sgd", "memft-ot dropout=2"):
        with pytest.raises(UserError):
            parse_variant(bad)


def test_bits_per_parameter_by_hand():
    phonebook = {"exact_match": 0.25, "entries": 64, "params": 6336, "token_accuracy": 0.5, "answer_tokens": 640}
    # 16 numbers recalled, each log2(4e9) bits (first digit 6-9, nine free digits)
    assert bits_per_parameter(phonebook, Regime("starved"), 49152) == pytest.approx(16 * 31.897 / 6336, rel=1e-4)
    long = {"exact_match": 0.0, "entries": 1, "params": 12672, "token_accuracy": 0.25, "answer_tokens": 256}
    # 64 greedy-correct random tokens of log2(49152) = 15.585 bits
    assert bits_per_parameter(long, Regime("long"), 49152) == pytest.approx(64 * 15.585 / 12672, rel=1e-4)


def test_table_medians_and_seeds_matching_the_baseline():
    def row(variant, seed, exact, acc, cert=None):
        return {"regime": "easy", "rank": 8, "variant": variant, "seed": seed, "exact_match": exact,
                "token_accuracy": acc, "l_final": 0.1 * seed, "certified_at_step": cert, "wall_s": 10.0 + seed,
                "bits_per_param": exact, "first_exact_step": None if cert is None else cert // 2}
    rows = [row("sft", 0, 0.5, 0.6, 40), row("ot", 0, 0.6, 0.6, 20), row("sft", 1, 0.5, 0.7, 50),
            row("ot", 1, 0.4, 0.9, 30), row("sft", 2, 0.2, 0.2, 60), row("ot", 2, 0.3, 0.3, 70)]
    table = {r["variant"]: r for r in table_rows(rows)}
    assert table["ot"]["exact_match"] == 0.4 and table["ot"]["token_accuracy"] == 0.6
    assert table["ot"]["steps_to_certified"] == 30 and table["sft"]["steps_to_certified"] == 50
    assert table["ot"]["first_exact_step"] == 15 and table["sft"]["first_exact_step"] == 25
    assert table["ot"]["matches_baseline"] == "2/3"  # seed 1 loses on exact match
    assert table["sft"]["matches_baseline"] == "3/3"
    rows[1]["certified_at_step"] = None  # a seed that never certified: no median of steps
    rows[1]["first_exact_step"] = None
    again = {r["variant"]: r for r in table_rows(rows)}["ot"]
    assert again["steps_to_certified"] is None and again["first_exact_step"] is None
    assert math.isclose(table["ot"]["wall_s"], 11.0)


def test_first_exact_step_is_the_first_check_that_recalls_an_entry(tmp_path):
    rows = [{"step": 1, "objective": 3.0}, {"step": 5, "exact_match": 0.0, "certified": 0.0},
            {"step": 6, "objective": 1.0}, {"step": 10, "exact_match": 0.05, "certified": 0.0},
            {"step": 15, "exact_match": 0.0, "certified": 0.0}, {"step": 20, "exact_match": 1.0, "certified": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert first_exact_step(tmp_path) == 10
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    assert first_exact_step(tmp_path) is None
