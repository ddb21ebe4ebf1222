"""Tests of memcli.core.scoring: the numpy reference on hand-made rows, and the native kernel against the reference."""

import math

import numpy as np
import pytest

from memcli.core.scoring import TokenStats, native_available, score_logits, score_numpy

FLOAT_FIELDS = ("logprob", "prob", "target_logit", "best_other", "margin")
INT_FIELDS = ("argmax", "rank")


def assert_same_stats(got: TokenStats, want: TokenStats, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Equal integer fields; float fields equal up to float32-exp accuracy, with NaN/inf in the same places."""
    assert len(got) == len(want)
    for name in INT_FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == np.int64, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    for name in FLOAT_FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == np.float64, name
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, equal_nan=True, err_msg=name)


def random_block(rows: int, vocab: int, seed: int = 0, scale: float = 4.0):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((rows, vocab), dtype=np.float32) * np.float32(scale)
    targets = rng.integers(0, vocab, rows)
    return logits, targets


# ---------------------------------------------------------------- the reference, on cases worked out by hand


def test_hand_computed_probability():
    # softmax([0, ln 3]) = [1/4, 3/4]
    stats = score_numpy(np.array([[0.0, math.log(3.0)]]), [1])
    assert stats.prob[0] == pytest.approx(0.75, abs=1e-7)
    assert stats.logprob[0] == pytest.approx(math.log(0.75), abs=1e-7)
    assert stats.argmax[0] == 1 and stats.rank[0] == 0
    assert stats.best_other[0] == 0.0
    assert stats.margin[0] == pytest.approx(math.log(3.0), abs=1e-6)


def test_reference_ties_and_masked_entries():
    logits = np.array(
        [
            [1.0, 3.0, 3.0, 0.0],  # target 2 ties with 1: the argmax is the lower index 1, margin 0, rank 0
            [1.0, 3.0, 3.0, 0.0],  # target 0 loses to two entries
            [-np.inf, 2.0, -np.inf, -np.inf],  # only the target is unmasked: probability 1
            [-np.inf, 2.0, 5.0, -np.inf],  # a masked target: probability 0
        ],
        dtype=np.float32,
    )
    stats = score_numpy(logits, [2, 0, 1, 0])
    np.testing.assert_array_equal(stats.argmax, [1, 1, 1, 2])
    np.testing.assert_array_equal(stats.rank, [0, 2, 0, 2])
    np.testing.assert_array_equal(stats.margin[:2], [0.0, -2.0])
    assert stats.prob[2] == 1.0 and stats.best_other[2] == -np.inf and stats.margin[2] == np.inf
    assert stats.prob[3] == 0.0 and stats.logprob[3] == -np.inf and stats.margin[3] == -np.inf
    assert stats.prob[0] == pytest.approx(math.exp(3) / (math.e + 2 * math.exp(3) + 1), rel=1e-6)


def test_reference_invalid_rows():
    logits = np.array([[0.0, np.nan, 1.0], [0.0, np.inf, 1.0], [-np.inf, -np.inf, -np.inf]], dtype=np.float32)
    stats = score_numpy(logits, [2, 0, 1])
    for name in ("logprob", "prob", "best_other", "margin"):
        assert np.isnan(getattr(stats, name)).all(), name
    np.testing.assert_array_equal(stats.argmax, [-1, -1, -1])
    np.testing.assert_array_equal(stats.rank, [-1, -1, -1])
    np.testing.assert_array_equal(stats.target_logit, [1.0, 0.0, -np.inf])


def test_token_stats_concat_and_len():
    a = score_numpy(*random_block(3, 7, seed=1))
    b = score_numpy(*random_block(2, 7, seed=2))
    joined = TokenStats.concat([a, b])
    assert len(joined) == 5
    np.testing.assert_array_equal(joined.argmax, np.concatenate([a.argmax, b.argmax]))
    empty = TokenStats.concat([])
    assert len(empty) == 0 and empty.rank.dtype == np.int64 and empty.prob.dtype == np.float64


@pytest.mark.parametrize("impl", ["numpy", "native"])
def test_bad_inputs_raise(impl):
    if impl == "native":
        pytest.importorskip("memcli._native")
    logits = np.zeros((3, 5), dtype=np.float32)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        score_logits(logits, [0, 5, 1], impl=impl)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        score_logits(logits, [0, -1, 1], impl=impl)
    with pytest.raises(ValueError, match="entries but logits has 3 rows"):
        score_logits(logits, [0, 1], impl=impl)
    with pytest.raises(ValueError, match="2-D"):
        score_logits(np.zeros(5, dtype=np.float32), [0], impl=impl)
    with pytest.raises(ValueError, match="1-D"):
        score_logits(logits, [[0], [1], [2]], impl=impl)
    with pytest.raises(TypeError):
        score_logits(logits, [0.0, 1.0, 2.0], impl=impl)
    with pytest.raises(TypeError):
        score_logits(np.zeros((3, 5), dtype=np.int32), [0, 1, 2], impl=impl)
    with pytest.raises(ValueError, match="impl"):
        score_logits(logits, [0, 1, 2], impl="gpu")


# ---------------------------------------------------------------- the native kernel against the reference


@pytest.fixture(params=["auto", "portable"])
def native(request, monkeypatch):
    """The kernel module, once with the best code path for this CPU and once forced to the portable one."""
    module = pytest.importorskip("memcli._native")
    if request.param == "portable":
        monkeypatch.setenv("MEMCLI_NATIVE_SIMD", "portable")
        assert module.kernel_isa() == "portable"
    return module


def native_stats(native, logits, targets, threads=0) -> TokenStats:
    return TokenStats(**native.score_rows(logits, np.asarray(targets, dtype=np.int64), threads))


@pytest.mark.parametrize(
    "rows, vocab",
    [(1, 1), (1, 2), (5, 3), (7, 17), (33, 1000), (16, 1024), (9, 4099), (4, 49152), (2, 152064)],
)
def test_native_matches_reference_on_random_rows(native, rows, vocab):
    logits, targets = random_block(rows, vocab, seed=rows * 7919 + vocab)
    assert_same_stats(native_stats(native, logits, targets), score_numpy(logits, targets))


def test_native_confident_targets(native):
    # Rows where the target clearly wins (the common case in verification): margin > 0, rank 0.
    logits, targets = random_block(20, 3000, seed=5)
    logits[np.arange(20), targets] += 30.0
    got = native_stats(native, logits, targets)
    assert_same_stats(got, score_numpy(logits, targets))
    np.testing.assert_array_equal(got.argmax, targets)
    assert (got.rank == 0).all() and (got.margin > 0).all() and (got.prob > 0.99).all()


@pytest.mark.parametrize("threads", [1, 2, 3, 8, 16, 0])
def test_native_thread_counts_agree(native, threads):
    # 67 x 49152 is ~3.3M entries: the kernel starts a thread per ~64k entries, so every count here really runs
    # (more threads than this machine's cores included), and 67 rows split unevenly over them.
    logits, targets = random_block(67, 49152, seed=11)
    assert_same_stats(native_stats(native, logits, targets, threads), score_numpy(logits, targets))


def test_native_ties(native):
    vocab = 3000
    logits = np.zeros((6, vocab), dtype=np.float32)
    targets = np.array([2500, 10, 2999, 0, 1500, 7])
    logits[0, [700, 2500]] = 5.0  # target tied with an earlier entry in another block
    logits[1, [10, 2000]] = 5.0  # target tied with a later entry
    logits[2, [3, 1100, 2999]] = 5.0  # a three-way tie; target last
    logits[3, :] = 1.0  # everything tied; target first
    logits[4, [1200, 1300]] = 9.0  # two others tie above the target
    logits[5, 7] = 4.0  # a clear winner
    got = native_stats(native, logits, targets)
    assert_same_stats(got, score_numpy(logits, targets))
    np.testing.assert_array_equal(got.argmax, [700, 10, 3, 0, 1200, 7])
    np.testing.assert_array_equal(got.rank, [0, 0, 0, 0, 2, 0])
    np.testing.assert_array_equal(got.margin, [0.0, 0.0, 0.0, 0.0, -9.0, 4.0])


def test_native_masked_entries(native):
    logits, targets = random_block(8, 5000, seed=3)
    rng = np.random.default_rng(4)
    logits[rng.random(logits.shape) < 0.7] = -np.inf  # mask most of the vocabulary
    logits[0, :] = -np.inf
    logits[0, targets[0]] = 1.5  # the only unmasked entry is the target
    logits[1, targets[1]] = -np.inf  # a masked target
    logits[2, : targets[2]] = -np.inf
    logits[2, targets[2] + 1 :] = -np.inf
    logits[2, targets[2]] = 0.0  # the target alone, at logit 0
    got = native_stats(native, logits, targets)
    assert_same_stats(got, score_numpy(logits, targets))
    assert got.prob[0] == 1.0 and got.logprob[0] == 0.0 and got.margin[0] == np.inf
    assert got.prob[1] == 0.0 and got.logprob[1] == -np.inf
    assert got.prob[2] == 1.0


def test_native_very_large_logits(native):
    logits, targets = random_block(6, 4000, seed=8, scale=1e29)
    logits[0, 17] = 3e38  # near float32 max; differences overflow float32
    logits[1, :] = -3e38
    logits[1, targets[1]] = 3e38
    logits[2, :] = 1e30  # a flat row of huge values: uniform distribution
    got = native_stats(native, logits, targets)
    want = score_numpy(logits, targets)
    assert_same_stats(got, want, rtol=1e-6, atol=1e-6)
    assert got.prob[1] == 1.0 and np.isfinite(got.margin[1]) and got.margin[1] == pytest.approx(6e38, rel=1e-6)
    assert got.prob[2] == pytest.approx(1 / 4000, rel=1e-5) and got.argmax[2] == 0


def test_native_invalid_rows(native):
    logits, targets = random_block(8, 3000, seed=9)
    targets[:] = 1500
    logits[0, 2900] = np.nan
    logits[1, 1500] = np.nan  # a NaN target
    logits[2, 5] = np.inf
    logits[3, :] = -np.inf  # nothing unmasked
    logits[4, 2999] = np.nan  # in the scalar tail of the last block
    logits[5, :] = -np.inf  # masked target, a NaN among masked entries, a finite entry after them
    logits[5, 7] = np.nan
    logits[5, 2500] = 1.0
    logits[6, 1500] = np.inf  # an infinite target
    got = native_stats(native, logits, targets)
    assert_same_stats(got, score_numpy(logits, targets))
    np.testing.assert_array_equal(got.argmax[:7], [-1] * 7)
    np.testing.assert_array_equal(got.rank[:7], [-1] * 7)
    assert np.isnan(got.logprob[:7]).all() and np.isnan(got.margin[:7]).all()
    assert got.argmax[7] == logits[7].argmax() and np.isfinite(got.logprob[7])


def test_native_zero_rows(native):
    got = native_stats(native, np.zeros((0, 100), dtype=np.float32), [])
    assert len(got) == 0 and got.argmax.dtype == np.int64
    assert len(native_stats(native, np.zeros((0, 0), dtype=np.float32), [])) == 0


def test_native_rejects_bad_inputs(native):
    logits = np.zeros((3, 5), dtype=np.float32)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        native.score_rows(logits, np.array([0, 5, 1]), 1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        native.score_rows(logits, np.array([0, -1, 1]), 1)
    with pytest.raises(ValueError):
        native.score_rows(logits, np.array([0, 1]), 1)
    with pytest.raises(ValueError):
        native.score_rows(np.zeros((0, 0), dtype=np.float32), np.array([0]), 1)
    # No silent conversions: wrong dtype, dimension or layout is a TypeError.
    with pytest.raises(TypeError):
        native.score_rows(logits.astype(np.float64), np.array([0, 1, 2]), 1)
    with pytest.raises(TypeError):
        native.score_rows(logits, np.array([0, 1, 2], dtype=np.int32), 1)
    with pytest.raises(TypeError):
        native.score_rows(logits[0], np.array([0]), 1)
    with pytest.raises(TypeError):
        native.score_rows(np.zeros((5, 3), dtype=np.float32).T, np.array([0, 1, 2]), 1)


def test_native_reads_read_only_buffers(native):
    logits, targets = random_block(4, 300, seed=12)
    logits.flags.writeable = False
    assert_same_stats(native_stats(native, logits, targets), score_numpy(logits, targets))


# ---------------------------------------------------------------- the wrapper


def test_wrapper_converts_layout_and_dtype():
    pytest.importorskip("memcli._native")
    logits, targets = random_block(40, 600, seed=13)
    want = score_numpy(logits, targets)
    transposed = np.asfortranarray(logits)  # same values, column-major
    strided = np.repeat(logits, 2, axis=1)[:, ::2]  # a non-contiguous view
    for x in (transposed, strided, logits.astype(np.float64)):
        assert_same_stats(score_logits(x, targets, impl="native"), want)
    assert_same_stats(score_logits(logits, targets.astype(np.int32), impl="native"), want)
    assert_same_stats(score_logits(logits, list(targets), impl="native"), want)


def test_wrapper_impls_agree():
    logits, targets = random_block(12, 2000, seed=14)
    want = score_numpy(logits, targets)
    assert_same_stats(score_logits(logits, targets, impl="numpy"), want)
    assert_same_stats(score_logits(logits, targets), want)  # auto: native when built, else numpy
    try:
        import memcli._native  # noqa: F401

        built = True
    except ImportError:
        built = False
    assert native_available() == built
    if built:
        assert_same_stats(score_logits(logits, targets, threads=2, impl="native"), want)
    else:
        with pytest.raises(ImportError):
            score_logits(logits, targets, impl="native")


def test_wrapper_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    logits, targets = random_block(6, 500, seed=15)
    got = score_logits(torch.from_numpy(logits), torch.from_numpy(targets))
    assert_same_stats(got, score_numpy(logits, targets))
    half = torch.from_numpy(logits).to(torch.bfloat16)  # numpy has no bfloat16: converted via torch
    got = score_logits(half, torch.from_numpy(targets))
    assert_same_stats(got, score_numpy(half.float().numpy(), targets))
