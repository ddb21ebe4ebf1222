"""Per-token statistics from blocks of logits rows.

Verification produces one logits row per answer token (the model's scores for every vocabulary entry at that
position, under teacher forcing) and needs, per row, how the target token fares:

- ``logprob`` / ``prob``: the target's log-probability and probability under softmax(row);
- ``argmax``: the greedy choice (lowest index on ties); greedy decoding reproduces the token iff it equals the
  target (docs/method.md §2), and ``prob > 0.5`` certifies that;
- ``target_logit``, ``best_other`` (the highest logit of any other entry) and ``margin`` (their difference:
  > 0 when the target wins outright, 0 on a tie, < 0 when it loses);
- ``rank``: how many entries have a strictly higher logit than the target (0: argmax or tied for it).

Two implementations compute the same thing: the native kernel ``memcli._native.score_rows`` (C++, one pass per
row, rows in parallel, no copy of the logits) and :func:`score_numpy`, a plain vectorised reference.

Edge cases, identical in both: ``-inf`` entries (masked vocabulary) are allowed and simply get probability 0.
A row holding a NaN or ``+inf``, or only ``-inf`` entries, has no meaningful distribution; it gets NaN
``logprob``/``prob``/``best_other``/``margin`` and ``argmax = rank = -1`` (``target_logit`` keeps the raw
value), so that any recall check (``argmax == target``, ``prob > 0.5``, ``rank == 0``) fails on it.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np

# CE < ln 2 <=> p > 0.5: the certification threshold (docs/method.md §2). The one definition; objectives and
# the law import it from here (a module without torch).
LN2 = math.log(2.0)
IMPLS = ("auto", "native", "numpy")


@dataclass
class TokenStats:
    """Statistics of n scored tokens, one entry per logits row; all fields are 1-D numpy arrays of length n."""

    logprob: np.ndarray  # float64: log p(target)
    prob: np.ndarray  # float64: p(target)
    argmax: np.ndarray  # int64: greedy token id, lowest index on ties
    target_logit: np.ndarray  # float64: the target's logit
    best_other: np.ndarray  # float64: highest logit of any other token (-inf if there is none)
    margin: np.ndarray  # float64: target_logit - best_other
    rank: np.ndarray  # int64: number of tokens with a strictly higher logit than the target

    def __len__(self) -> int:
        return len(self.logprob)

    @classmethod
    def empty(cls) -> TokenStats:
        """Statistics of zero tokens, with the right dtypes."""
        return cls(**{f.name: np.empty(0, dtype=_DTYPES[f.name]) for f in fields(cls)})

    @classmethod
    def concat(cls, parts: Sequence[TokenStats]) -> TokenStats:
        """Join the statistics of several blocks, in order."""
        if not parts:
            return cls.empty()
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)})


_DTYPES = {
    "logprob": np.float64,
    "prob": np.float64,
    "argmax": np.int64,
    "target_logit": np.float64,
    "best_other": np.float64,
    "margin": np.float64,
    "rank": np.int64,
}


@functools.lru_cache(maxsize=None)
def _native_module() -> Any:
    """The compiled kernel module, or None when it was not built."""
    try:
        from memcli import _native  # lazy: the compiled kernel may be absent (the numpy reference then)
    except ImportError:
        return None
    return _native


def native_available() -> bool:
    """Whether the compiled kernel ``memcli._native`` can be imported."""
    return _native_module() is not None


def _as_logits(logits: Any) -> np.ndarray:
    """A float32, C-contiguous 2-D array; copies only when the input is not one already."""
    if hasattr(logits, "detach"):  # a torch tensor: to a CPU float32 array, without importing torch here
        logits = logits.detach().float().cpu().numpy()
    x = np.asarray(logits)
    if x.ndim != 2:
        raise ValueError(f"logits must be a 2-D [rows, vocab] array, got shape {x.shape}")
    if x.dtype.kind != "f":
        raise TypeError(f"logits must hold floating-point values, got dtype {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _as_targets(targets: Any, rows: int, vocab: int) -> np.ndarray:
    """An int64, C-contiguous 1-D array of `rows` token ids, each in [0, vocab)."""
    if hasattr(targets, "detach"):
        targets = targets.detach().cpu().numpy()
    t = np.asarray(targets)
    if t.ndim != 1:
        raise ValueError(f"targets must be a 1-D array of token ids, got shape {t.shape}")
    if t.size and t.dtype.kind not in "iu":
        raise TypeError(f"targets must hold integer token ids, got dtype {t.dtype}")
    if len(t) != rows:
        raise ValueError(f"targets has {len(t)} entries but logits has {rows} rows")
    t = np.ascontiguousarray(t, dtype=np.int64)
    bad = np.flatnonzero((t < 0) | (t >= vocab))
    if bad.size:
        row = int(bad[0])
        raise ValueError(f"target {int(t[row])} at row {row} is outside the vocabulary [0, {vocab})")
    return t


def score_numpy(logits: Any, targets: Any) -> TokenStats:
    """Reference implementation in vectorised numpy (several passes and temporaries; clarity over speed)."""
    x = _as_logits(logits)
    n, vocab = x.shape
    t = _as_targets(targets, n, vocab)
    if n == 0:
        return TokenStats.empty()
    rows = np.arange(n)

    target = x[rows, t]  # float32
    with np.errstate(invalid="ignore", over="ignore"):
        others = x.copy()
        others[rows, t] = -np.inf  # the target never counts as its own competitor
        best_other = others.max(axis=1)
        del others
        # logprob = target - logsumexp(row), shifted by the row max `top`: exp in float32 (exact enough), the sum
        # in float64. (target - top) is taken first so that huge logits (1e30) do not swamp log(sum).
        top = np.maximum(target, best_other)
        shifted = x - top[:, None]
        np.exp(shifted, out=shifted)
        log_sum = np.log(shifted.sum(axis=1, dtype=np.float64))
        del shifted
        logprob = (target.astype(np.float64) - top.astype(np.float64)) - log_sum
        prob = np.exp(logprob)
        margin = target.astype(np.float64) - best_other.astype(np.float64)
    argmax = x.argmax(axis=1).astype(np.int64)  # numpy returns the first of tied maxima
    rank = (x > target[:, None]).sum(axis=1).astype(np.int64)

    # Rows without a meaningful distribution: any NaN or +inf, or nothing above -inf.
    invalid = np.isnan(x).any(axis=1) | (x == np.inf).any(axis=1) | (top == -np.inf)
    best_other = best_other.astype(np.float64)
    for a in (logprob, prob, best_other, margin):
        a[invalid] = np.nan
    argmax[invalid] = -1
    rank[invalid] = -1
    return TokenStats(
        logprob=logprob,
        prob=prob,
        argmax=argmax,
        target_logit=target.astype(np.float64),
        best_other=best_other,
        margin=margin,
        rank=rank,
    )


def score_logits(logits: Any, targets: Any, threads: int = 0, impl: str = "auto") -> TokenStats:
    """Score each logits row against its target token id.

    logits: [n, V] floating-point array (numpy array, or a torch tensor on any device). Used in place when it
    is already float32 and C-contiguous; otherwise converted once. targets: [n] integer token ids in [0, V).
    threads: worker threads of the native kernel (0: one per CPU this process may use).
    impl: "native" (the C++ kernel; ImportError if it was not built), "numpy" (the reference) or "auto"
    (native when available).
    Raises ValueError for a bad shape or an out-of-range target, TypeError for a non-numeric dtype.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    x = _as_logits(logits)
    t = _as_targets(targets, *x.shape)
    native = _native_module()
    if impl == "numpy" or (impl == "auto" and native is None):
        return score_numpy(x, t)
    if native is None:
        raise ImportError("the native scoring kernel memcli._native is not built; reinstall memcli with pip")
    return TokenStats(**native.score_rows(x, t, int(threads) if threads > 0 else default_threads()))


def default_threads() -> int:
    """The number of CPUs this process may run on (what threads=0 means)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not available on macOS and Windows
        return os.cpu_count() or 1


# --- KL between two blocks of logits rows (locality: the base model's distribution against the tuned one's) -----

def kl_numpy(p: Any, q: Any) -> np.ndarray:
    """Reference: KL(softmax(p) || softmax(q)) per row pair, in nats (float64). An entry masked (-inf) in p
    contributes nothing; one masked in q but not in p gives +inf. A row of either block holding a NaN or +inf,
    or only -inf entries, gives NaN."""
    a, b = _as_logits(p), _as_logits(q)
    if a.shape != b.shape:
        raise ValueError(f"p has shape {a.shape} but q has {b.shape}")
    if a.shape[0] == 0:
        return np.empty(0, np.float64)
    a, b = a.astype(np.float64), b.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        mp, mq = a.max(axis=1, keepdims=True), b.max(axis=1, keepdims=True)
        lp = a - mp - np.log(np.exp(a - mp).sum(axis=1, keepdims=True))
        lq = b - mq - np.log(np.exp(b - mq).sum(axis=1, keepdims=True))
        terms = np.where(a > -np.inf, np.exp(lp) * (lp - lq), 0.0)
        kl = terms.sum(axis=1)
    invalid = (np.isnan(a).any(axis=1) | np.isnan(b).any(axis=1) | ~np.isfinite(mp[:, 0]) | ~np.isfinite(mq[:, 0]))
    kl[invalid] = np.nan
    return kl


def kl_logits(p: Any, q: Any, threads: int = 0, impl: str = "auto") -> np.ndarray:
    """KL(softmax(p) || softmax(q)) of each row pair of two [n, V] logits blocks (numpy arrays or torch tensors),
    in nats: the native kernel (`memcli._native.kl_rows`, one sweep per row after the maxima, rows in parallel)
    or the reference `kl_numpy`; `impl` and `threads` as in `score_logits`."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    a, b = _as_logits(p), _as_logits(q)
    if a.shape != b.shape:
        raise ValueError(f"p has shape {a.shape} but q has {b.shape}")
    native = _native_module()
    if impl == "numpy" or (impl == "auto" and native is None):
        return kl_numpy(a, b)
    if native is None:
        raise ImportError("the native scoring kernel memcli._native is not built; reinstall memcli with pip")
    return native.kl_rows(a, b, int(threads) if threads > 0 else default_threads())
