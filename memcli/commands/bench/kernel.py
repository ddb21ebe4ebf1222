"""Benchmark of the logits-reduction kernel: native C++ against the numpy reference on the same block.

    memcli bench kernel [--rows 512] [--vocab 49152] [--repeats 5] [--threads 0]
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import numpy as np

from memcli.core.scoring import default_threads, native_available, score_logits


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: first-touch page faults, thread start-up, lazy imports
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_kernel(rows: int = 512, vocab: int = 49152, repeats: int = 5, threads: int = 0, seed: int = 0) -> dict:
    """Time score_logits with impl="native" and impl="numpy" on one random [rows, vocab] float32 block.

    Returns rows, vocab, threads (as resolved: 0 means one per usable CPU), isa (the native code path, or None),
    native_s and numpy_s (median seconds per call; native_s is None when the kernel is not built),
    speedup (numpy_s / native_s, or None) and max_logprob_diff (largest |difference| in logprob).
    """
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((rows, vocab), dtype=np.float32) * np.float32(4.0)
    targets = rng.integers(0, vocab, rows)

    result: dict[str, Any] = {
        "rows": rows,
        "vocab": vocab,
        "threads": threads if threads > 0 else default_threads(),
        "isa": None,
        "native_s": None,
        "numpy_s": _median_seconds(lambda: score_logits(logits, targets, impl="numpy"), repeats),
        "speedup": None,
        "max_logprob_diff": None,
    }
    if native_available():
        from memcli import _native  # built: native_available() said so

        result["isa"] = _native.kernel_isa()
        result["native_s"] = _median_seconds(
            lambda: score_logits(logits, targets, threads=threads, impl="native"), repeats
        )
        result["speedup"] = result["numpy_s"] / result["native_s"]
        native = score_logits(logits, targets, threads=threads, impl="native")
        reference = score_logits(logits, targets, impl="numpy")
        result["max_logprob_diff"] = float(np.max(np.abs(native.logprob - reference.logprob), initial=0.0))
    return result


def format_table(result: dict) -> str:
    """A small side-by-side table of one bench_kernel result."""
    rows, vocab = result["rows"], result["vocab"]
    lines = [f"scoring {rows} x {vocab} float32 logits ({result['threads']} threads)", ""]
    lines.append(f"{'impl':<10} {'median ms':>10} {'ns/logit':>9} {'speed-up':>9}")
    for name, key in (("numpy", "numpy_s"), ("native", "native_s")):
        seconds = result[key]
        if seconds is None:
            lines.append(f"{name:<10} {'not built':>10}")
            continue
        speedup = result["numpy_s"] / seconds
        lines.append(f"{name:<10} {seconds * 1e3:>10.2f} {seconds * 1e9 / (rows * vocab):>9.3f} {speedup:>8.1f}x")
    if result["native_s"] is not None:
        lines.append("")
        lines.append(f"native code path: {result['isa']}; max |logprob difference|: {result['max_logprob_diff']:.1e}")
    return "\n".join(lines)
