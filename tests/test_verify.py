"""`memcli verify`: verdict logic on hand-built statistics and logits, then both backends on a briefly trained
tiny run (teacher-forced verdicts against real greedy generation, packing invariance, backend agreement), the
report folder, and bad input with exit codes."""

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import collect
from typer.testing import CliRunner

from memcli.commands.verify.generation import compare_generation, generation_sample
from memcli.commands.verify.run import VerifyOptions, verify
from memcli.core import corpus, models
from memcli.core.errors import UserError
from memcli.core.scoring import TokenStats, score_logits
from memcli.core.verdicts import Generated, RecallTotals, entry_verdict, verdicts


def stats_of(prob, argmax, margin, logprob=None):
    prob = np.asarray(prob, dtype=np.float64)
    n = len(prob)
    return TokenStats(logprob=np.log(prob) if logprob is None else np.asarray(logprob, dtype=np.float64),
                      prob=prob, argmax=np.asarray(argmax, dtype=np.int64), target_logit=np.zeros(n),
                      best_other=-np.asarray(margin, dtype=np.float64), margin=np.asarray(margin, dtype=np.float64),
                      rank=np.zeros(n, dtype=np.int64))


# --- verdict logic, no model ------------------------------------------------------------------------------

def test_p_exactly_one_half_is_exact_but_not_certified():
    v = entry_verdict(stats_of([0.9, 0.5, 0.8], [7, 8, 9], [3.0, 0.2, 2.0]), [7, 8, 9])
    assert v.exact and not v.certified
    assert v.at_risk  # exact, but a token at p <= 0.5
    assert v.sub_threshold == [1] and v.wrong_argmax == []
    assert v.first_failure is None and v.token_accuracy == 1.0
    assert v.min_p == 0.5 and v.min_p_position == 1
    assert v.min_margin == pytest.approx(0.2) and v.min_margin_position == 1
    assert v.ce == pytest.approx(-(math.log(0.9) + math.log(0.5) + math.log(0.8)) / 3)


def test_just_above_one_half_everywhere_is_certified():
    v = entry_verdict(stats_of([0.5000001, 0.99], [1, 2], [1.5, 4.0]), [1, 2])
    assert v.exact and v.certified and not v.at_risk and v.sub_threshold == []


def test_small_margin_puts_an_exact_certified_entry_at_risk():
    v = entry_verdict(stats_of([0.6, 0.99], [1, 2], [0.4, 4.0]), [1, 2], risk_margin=1.0)
    assert v.exact and v.certified and v.at_risk
    assert not entry_verdict(stats_of([0.6, 0.99], [1, 2], [0.4, 4.0]), [1, 2], risk_margin=0.3).at_risk


def test_first_failure_and_token_accuracy():
    targets = [5, 6, 7, 8]
    v = entry_verdict(stats_of([0.9, 0.4, 0.3, 0.2], [5, 6, 1, 2], [2, 0.1, -1, -2]), targets)
    assert not v.exact and not v.certified and not v.at_risk  # at risk is about exact entries
    assert v.first_failure == 2 and v.token_accuracy == 0.5 and v.greedy_correct == 2
    assert v.wrong_argmax == [2, 3] and v.sub_threshold == [1, 2, 3] and v.low_margin == [1, 2, 3]
    assert v.predicted == 1


@pytest.mark.parametrize("impl", ["numpy", "native"])
def test_ties_on_hand_built_logits_follow_the_lowest_id(impl):
    """At an exact tie the argmax is the lowest id: a target tied with a lower id is a greedy miss, tied with a
    higher id a greedy hit; either way p = 0.5 exactly (two-way tie), so never certified, margin 0."""
    if impl == "native":
        pytest.importorskip("memcli._native")
    logits = np.array([[0.0, 0.0, -np.inf], [0.0, 0.0, -np.inf]], dtype=np.float32)
    hit = score_logits(logits[:1], np.array([0]), impl=impl)
    miss = score_logits(logits[1:], np.array([1]), impl=impl)
    vh, vm = entry_verdict(hit, [0]), entry_verdict(miss, [1])
    assert hit.prob[0] == 0.5 and miss.prob[0] == 0.5
    assert vh.exact and not vh.certified and vh.at_risk and vh.min_margin == 0.0
    assert not vm.exact and vm.first_failure == 0 and vm.predicted == 0
    # p just above 0.5 on real logits: certified
    up = score_logits(np.array([[0.001, 0.0, -np.inf]], dtype=np.float32), np.array([0]), impl=impl)
    assert entry_verdict(up, [0]).certified


def test_block_verdicts_match_hand_computed_expectations():
    """Five entries in one block, every statistic chosen by hand and every expectation worked out by hand from
    the rules of docs/method.md §2 (not from another function of memcli)."""
    nan = math.nan
    # entry:      A      B                          C                 D (no distribution)   E (tie at 0)
    prob = [0.9, 0.8, 0.3, 0.6, 0.2, 0.7, 0.95, 0.7, nan, 0.99, 0.5, 0.99]
    margin = [2.5, 1.5, 0.2, -0.3, -2.0, 0.5, 3.0, 0.5, nan, 4.0, 0.0, 3.0]
    targets = [11, 21, 22, 23, 24, 31, 32, 33, 41, 42, 51, 52]
    argmax = [11, 21, 22, 7, 8, 31, 32, 33, -1, 42, 51, 52]
    lengths = [1, 4, 3, 2, 2]
    logprob = [math.log(0.9), math.log(0.8), math.log(0.3), math.log(0.6), math.log(0.2), math.log(0.7),
               math.log(0.95), math.log(0.7), nan, math.log(0.99), math.log(0.5), math.log(0.99)]
    stats = stats_of(prob, argmax, margin, logprob)
    got = verdicts(stats, targets, lengths, indices=[10, 11, 12, 13, 14])
    fields = ("index", "answer_tokens", "exact", "certified", "at_risk", "first_failure", "token_accuracy",
              "min_p_position", "min_margin_position", "sub_threshold", "wrong_argmax", "low_margin", "predicted")
    expected = [
        # A: one token, p 0.9, margin 2.5 >= 1: exact, certified, safe
        (10, 1, True, True, False, None, 1.0, 0, 0, [], [], [], None),
        # B: argmax wrong from position 2 (greedy emits 7 there); p <= 0.5 at 1 and 3; margins < 1 at 1, 2, 3
        (11, 4, False, False, False, 2, 0.5, 3, 3, [1, 3], [2, 3], [1, 2, 3], 7),
        # C: all right and p > 0.5, but margins 0.5 < 1 at 0 and 2: at risk; the first of tied minima is named
        (12, 3, True, True, True, None, 1.0, 0, 0, [], [], [0, 2], None),
        # D: a row with NaN logits counts as wrong and sub-threshold; no greedy token (-1)
        (13, 2, False, False, False, 0, 0.0, 0, 0, [0], [0], [0], -1),
        # E: target tied for the argmax at position 0 (lowest id is the target): exact, p = 0.5 not certified
        (14, 2, True, False, True, None, 1.0, 0, 0, [0], [], [0], None),
    ]
    assert len(got) == 5
    for v, want in zip(got, expected):
        assert tuple(getattr(v, f) for f in fields) == want, v.index
    assert [v.min_p for v in got[:3]] == [0.9, 0.2, 0.7] and got[4].min_p == 0.5
    assert [v.min_margin for v in got[:3]] == [2.5, -2.0, 0.5] and got[4].min_margin == 0.0
    assert math.isnan(got[3].min_p) and math.isnan(got[3].min_margin) and math.isnan(got[3].ce)
    assert got[0].ce == pytest.approx(-math.log(0.9))
    assert got[1].ce == pytest.approx(-math.log(0.8 * 0.3 * 0.6 * 0.2) / 4)
    assert got[4].ce == pytest.approx(-math.log(0.5 * 0.99) / 2)
    assert [v.greedy_correct for v in got] == [1, 2, 3, 0, 2]
    # a smaller risk margin: C's margins of 0.5 are safe, E's tie (margin 0, p = 0.5) is not
    loose = verdicts(stats, targets, lengths, risk_margin=0.4)
    assert [v.at_risk for v in loose] == [False, False, False, False, True]
    assert [v.low_margin for v in loose] == [[], [1, 2, 3], [], [0], [0]]
    assert [v.index for v in loose] == [0, 1, 2, 3, 4]  # without indices: positions in the block
    with pytest.raises(ValueError):
        verdicts(stats, targets, [1, 4, 3, 2, 1])  # lengths that do not cover the rows
    with pytest.raises(ValueError):
        verdicts(stats, targets, [1, 4, 3, 4, 0])  # an entry without answer tokens


def test_a_nan_logit_row_from_the_kernel_fails_its_entry():
    """Logits holding NaN have no distribution (memcli.core.scoring): the entry is neither exact nor certified."""
    logits = np.array([[3.0, 0.0, 0.0], [0.0, np.nan, 1.0], [0.0, 0.0, 5.0]], dtype=np.float32)
    v = verdicts(score_logits(logits, np.array([0, 2, 2]), impl="numpy"), [0, 2, 2], [1, 2])
    assert v[0].exact and v[0].certified
    assert (v[1].exact, v[1].certified, v[1].first_failure, v[1].sub_threshold) == (False, False, 0, [0])
    assert math.isnan(v[1].min_p) and v[1].min_p_position == 0


@pytest.mark.parametrize("padded, budget, max_seqs, groups", [
    (False, 8, None, [(0, 2), (2, 3), (3, 5)]),  # llama: packed tokens 3+5 | 2 (2+7 > 8) | 7+1
    (False, 100, 2, [(0, 2), (2, 4), (4, 5)]),  # llama: llama.cpp's limit of parallel sequences
    (False, 4, None, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]),  # an entry over budget is a group of its own
    (True, 10, None, [(0, 2), (2, 3), (3, 4), (4, 5)]),  # torch: 2 x 5 = 10 fits, 3 x 5 and 2 x 7 do not
])
def test_batch_groups_of_the_backends(padded, budget, max_seqs, groups):
    from memcli.core.batching import plan_batches

    assert plan_batches([3, 5, 2, 7, 1], budget, padded=padded, max_seqs=max_seqs) == groups


def test_totals_and_generation_comparison():
    vs = [entry_verdict(stats_of([0.9, 0.8], [1, 2], [2, 2]), [1, 2]),
          entry_verdict(stats_of([0.9, 0.4], [1, 5], [2, -1]), [1, 2]),
          entry_verdict(stats_of([0.9, 0.5], [1, 2], [2, 0.0]), [1, 2])]
    for i, v in enumerate(vs):
        v.index = i
    totals = RecallTotals()
    for i, v in enumerate(vs):
        totals.add(v, line=i + 1)
    s = totals.summary()
    assert s["exact"] == 2 and s["certified"] == 1 and s["at_risk"] == 1
    assert s["exact_match_rate"] == pytest.approx(2 / 3) and s["token_accuracy"] == pytest.approx(5 / 6)
    assert s["failing_lines"] == [2] and s["at_risk_lines"] == [3]
    margins = [np.array([2.0, 2.0]), np.array([2.0, -1.0]), np.array([2.0, 0.0])]
    gen = [Generated(0, [1, 2], None, [2.0, 2.0]), Generated(1, [1, 5], 1, [2.0, -1.0]),
           Generated(2, [1, 9], 1, [2.0, -0.01])]
    tf = {i: (v, m) for i, (v, m) in enumerate(zip(vs, margins))}
    cmp = compare_generation(gen, tf, [1, 2, 3])
    assert cmp["agree"] == 2 and len(cmp["disagreements"]) == 1
    d = cmp["disagreements"][0]  # entry 3: the teacher-forced pass ties at position 1 (lowest id wins)
    assert d["line"] == 3 and d["position"] == 1 and d["tie"] and cmp["ties"] == 1 and cmp["unexplained"] == 0
    gen[2] = Generated(2, [1, 9], 1, [2.0, -0.05])
    tf[2] = (tf[2][0], np.array([2.0, 0.03]))
    near = compare_generation(gen, tf, [1, 2, 3])
    assert near["near_ties"] == 1 and not near["disagreements"][0]["tie"] and near["unexplained"] == 0
    gen[2] = Generated(2, [1, 9], 1, [2.0, -3.0])
    assert compare_generation(gen, tf, [1, 2, 3])["unexplained"] == 1
    assert compare_generation(gen, tf, [1, 2, 3], near=5.0)["near_ties"] == 1
    assert generation_sample(10, 3) == [0, 4, 9] and generation_sample(3, 10) == [0, 1, 2]


# --- the tiny model, briefly trained ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_examples(pb8, tiny_tokenizer):
    return corpus.load_examples(pb8, tiny_tokenizer)



@pytest.fixture(scope="module")
def llama(tiny_gguf):
    from memcli.gguf.base import base_gguf
    from memcli.llama.scorer import LlamaBackend

    backend = LlamaBackend(base_gguf(models.resolve("tiny")), tiny_gguf, threads=1, kv_type="f32")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def torch_backend(tiny_run):
    from memcli.commands.verify.peft_backend import TorchBackend

    return TorchBackend(models.resolve("tiny"), tiny_run / "adapter", device="cpu", threads=1)


def test_llama_teacher_forced_verdicts_equal_greedy_generation(llama, tiny_examples):
    tf = collect(llama, tiny_examples, 2048)
    exact = sum(v.exact for v, _ in tf.values())
    assert 0 < exact < len(tiny_examples)  # entries learned and entries not learned
    generated = llama.generate(tiny_examples, list(range(len(tiny_examples))))
    for g in generated:
        v = tf[g.index][0]
        assert g.first_divergence == v.first_failure, (g, v)
        assert len(g.margins) == len(g.tokens) and (g.margins[-1] < 0) == (not v.exact)
        assert g.tokens[: v.greedy_correct] == list(tiny_examples[g.index].target_ids[: v.greedy_correct])
        if not v.exact:
            assert g.tokens[-1] == v.predicted  # the same wrong token


def test_torch_teacher_forced_verdicts_equal_greedy_generation(torch_backend, tiny_examples):
    tf = collect(torch_backend, tiny_examples, 2048)
    assert 0 < sum(v.exact for v, _ in tf.values()) < len(tiny_examples)
    for g in torch_backend.generate(tiny_examples, list(range(len(tiny_examples)))):
        v = tf[g.index][0]
        assert g.first_divergence == v.first_failure, (g, v)


def test_packing_does_not_change_verdicts_or_probabilities(llama, torch_backend, tiny_examples):
    reference = collect(llama, tiny_examples, 2048)  # all 8 entries in one batch
    reversed_examples = tiny_examples[::-1]
    n = len(tiny_examples)
    for backend in (llama, torch_backend):
        # one entry per batch; 7 tokens: every entry is split over several decodes (llama.cpp); reversed order
        for examples, batch_tokens in ((tiny_examples, 16), (tiny_examples, 7), (reversed_examples, 40)):
            got = collect(backend, examples, batch_tokens)
            for i, (v, p) in got.items():
                j = i if examples is tiny_examples else n - 1 - i
                ref_v, ref_p = reference[j]
                assert (v.exact, v.certified, v.first_failure, v.sub_threshold) == \
                    (ref_v.exact, ref_v.certified, ref_v.first_failure, ref_v.sub_threshold), (backend.name, i)
                np.testing.assert_allclose(p, ref_p, rtol=0, atol=3e-3)
    assert len(llama.plan) > 1


def test_backends_agree_on_a_trained_tiny_run(tiny_run, pb8, tmp_path):
    reports = {}
    for backend in ("llama", "torch"):
        opts = VerifyOptions(backend=backend, threads=1, kv_type="f32", min_exact=0.0, generate=3)
        reports[backend] = verify(pb8, tmp_path / backend, lora=tiny_run, options=opts, log=lambda m: None)
        assert reports[backend]["generation"]["agree"] == 3
    rows = {b: [json.loads(x) for x in (tmp_path / b / "entries.jsonl").read_text().splitlines()] for b in reports}
    assert [r["line"] for r in rows["llama"]] == list(range(1, 9))
    for a, b in zip(rows["llama"], rows["torch"]):
        assert (a["exact"], a["certified"], a["first_failure"]) == (b["exact"], b["certified"], b["first_failure"])
        assert a["min_p"] == pytest.approx(b["min_p"], abs=3e-3)  # see the packing test on tolerance
    t = reports["llama"]["totals"]
    assert t == {**t, **{k: reports["torch"]["totals"][k] for k in ("exact", "certified", "at_risk")}}
    assert t["mean_ce"] == pytest.approx(reports["torch"]["totals"]["mean_ce"], rel=1e-3)
    # the report folder
    assert {p.name for p in (tmp_path / "llama").iterdir()} == {"report.json", "entries.jsonl",
                                                                 "target_probability.png"}
    report = json.loads((tmp_path / "llama" / "report.json").read_text())
    assert report["settings"]["backend"] == "llama" and report["backend"]["n_seq_max"] == 8
    assert report["timings"]["decode_s"] > 0 and report["tokenizer_check"]["mismatches"] == 0
    failing = [r for r in rows["llama"] if not r["exact"]]
    assert failing and all(r["at_failure"]["expected_text"].isdigit() for r in failing)


# --- the command: exit codes and bad input ------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli():
    from memcli.cli.app import app

    def invoke(*args):
        return CliRunner().invoke(app, ["verify", *map(str, args)], catch_exceptions=False)
    return invoke


def leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_exit_codes_follow_the_exact_match_rate(cli, tiny_gguf, pb8, tmp_path):
    common = ["--threads", "1", "--kv-type", "f32"]
    passed = cli(pb8, "--lora", tiny_gguf, "--out", tmp_path / "a", "--min-exact", "0.25", *common)
    assert passed.exit_code == 0, passed.output
    assert "exact match" in passed.stdout and "PASS" in passed.stdout
    failed = cli(pb8, "--lora", tiny_gguf, "--out", tmp_path / "a", *common)  # replaces the earlier report
    assert failed.exit_code == 1 and "FAIL" in failed.stdout and "not recalled" in failed.stdout
    assert (tmp_path / "a" / "report.json").exists() and leftovers(tmp_path) == []


def test_bad_input_exits_2_and_writes_nothing(cli, tiny_run, tiny_gguf, pb8, tmp_path):
    bad_corpus = tmp_path / "bad.jsonl"
    bad_corpus.write_text('{"query": "A:", "target": "1"}\n{"query": oops}\n')
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(tiny_gguf, lone / "adapter.gguf")
    not_a_report = tmp_path / "notes"
    not_a_report.mkdir()
    (not_a_report / "keep.txt").write_text("mine")
    cases = [
        ([bad_corpus, "--lora", tiny_gguf], "bad.jsonl:2: malformed JSON"),
        ([pb8, "--lora", tmp_path / "missing"], "does not exist"),
        ([pb8, "--lora", tiny_gguf, "--model", "smollm2-135m"], "was trained for tiny"),
        ([pb8, "--lora", lone / "adapter.gguf", "--backend", "torch"], "needs the PEFT adapter"),
        ([pb8, "--lora", tiny_run, "--backend", "vllm"], "--backend must be one of"),
        ([pb8, "--lora", tiny_run, "--min-exact", "2"], "--min-exact"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        result = cli(*args, "--out", out, "--threads", "1")
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.stderr.split()), (message, result.stderr)
        assert not out.exists() and leftovers(tmp_path) == []
    result = cli(pb8, "--lora", tiny_gguf, "--out", not_a_report)
    assert result.exit_code == 2 and "not a verify report" in result.stderr
    assert [p.name for p in not_a_report.iterdir()] == ["keep.txt"]


def test_too_long_for_the_context_is_refused(tiny_gguf, tmp_path, tiny_tokenizer):
    from memcli.core.datagen import generate_random_tokens

    long_value = generate_random_tokens(4200, 0, tiny_tokenizer)  # tiny's context is 4096
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(long_value) + "\n")
    with pytest.raises(UserError) as e:
        verify(path, tmp_path / "out", lora=tiny_gguf, options=VerifyOptions(threads=1), log=lambda m: None)
    assert "longer than the model's context of 4096" in str(e.value) and "long.jsonl:1" in str(e.value)
    assert not (tmp_path / "out").exists()
    # --answer-tokens verifies a prefix that fits
    report = verify(path, tmp_path / "out", lora=tiny_gguf, log=lambda m: None,
                    options=VerifyOptions(threads=1, answer_tokens=300, min_exact=0.0))
    assert report["totals"]["answer_tokens"] == 300 and report["totals"]["entries"] == 1


def test_a_bare_peft_folder_finds_its_base_model(tiny_run, pb8, tmp_path):
    peft = tmp_path / "peft"
    shutil.copytree(tiny_run / "adapter", peft)
    for backend in ("torch", "llama"):
        report = verify(pb8, tmp_path / backend, lora=peft, log=lambda m: None,
                        options=VerifyOptions(backend=backend, threads=1, min_exact=0.0))
        assert report["settings"]["model"] == "tiny"
        assert 0 < report["totals"]["exact"] < 8


@pytest.mark.slow  # a benchmark
def test_bench_verify_runs_side_by_side(cli, tiny_run, pb8, tmp_path):
    """A smoke test of `memcli bench verify` (its numbers are the benchmark's business, not a test's)."""
    from memcli.cli.app import app

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "verify", str(pb8), "--lora", str(tiny_run), "--threads", "1",
                                      "--baseline-entries", "2", "--skip", "kernel,memory", "--out", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    assert results["a"]["entries"] == 8 and results["b"]["entries"] == 2 and results["c"]["entries"] == 2
    for k in ("b", "c", "d"):
        assert results[k]["agree"] == results[k]["compared"], k
    assert "(scaled)" in result.stdout


def test_verify_in_llama_cpp_runs_without_torch(tiny_run, pb8, tmp_path):
    """The whole llama.cpp verify, as a user starts it, never imports torch, transformers' models or PEFT (they
    cost seconds of start-up): its tokenizer is loaded without them."""
    code = ("import runpy, sys\n"
            f"sys.argv = ['memcli', 'verify', {str(pb8)!r}, '--lora', {str(tiny_run)!r}, '--out', "
            f"{str(tmp_path / 'v')!r}]\n"
            "try:\n    runpy.run_module('memcli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers.modeling_utils', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert (tmp_path / "v" / "report.json").exists()
    assert out.strip().splitlines()[-1] == "[]"
