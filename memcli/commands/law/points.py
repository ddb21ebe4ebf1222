"""The law's terms and the runs it is fitted on (docs/method.md §5).

    delta_l(x, l) = C * x**alpha * l**(-beta) + b

x is the adapter's capacity (LoRA rank, or trainable parameter count N), l the number of answer tokens and
delta_l = L_init - L_final the drop in mean answer-token cross-entropy (nats). A run is one Point, read from a
sweep folder, a run folder, a summary.json (through memcli.core.runs) or a row of a CSV/JSONL table. Runs that ended
saturated (L_final <= ln 2: every token is already certified, docs/method.md §2) no longer follow the law and
are dropped before fitting; check_fittable says whether the rest can determine the four coefficients.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from memcli.core import runs
from memcli.core.errors import UserError
from memcli.core.scoring import LN2
from memcli.training.config import complete_settings

# The defaults of `memcli fit` and `memcli plan`, written once: memcli.cli.app's options and the functions of fit.py
# and plan.py take them from here.
CAPACITY = "rank"  # the capacity variable x: rank | params
LAW_FILE = "law.json"  # fit's --out
N_BOOT = 200  # bootstrap resamples for the intervals
LEVEL = 0.95  # the intervals' level
BOOT_SEED = 0  # the bootstrap's seed
MARGIN = 0.1  # plan: the predicted L_final must reach ln 2 - margin
GOAL = "recall"  # plan: recall | loss
PROBE_RANKS = (1, 2, 3, 4, 6, 8)  # plan --probe: the ranks of its sweep
PROBE_SHARES = (0.0625, 0.125, 0.1875, 0.25)  # plan --probe: its prefixes, as shares of the corpus's answer tokens

CAPACITIES = ("rank", "params")
COEFFICIENTS = ("C", "alpha", "beta", "b")
N_PARAMETERS = len(COEFFICIENTS)

_LENGTH_COLUMNS = ("length", "answer_tokens")


class LawError(UserError, ValueError):
    """Bad input to the law: a file, a field, too little data, or a law of another capacity measure."""


def law_value(x, length, C, alpha, beta, b):
    """delta_l = C x^alpha l^-beta + b, broadcasting over every argument."""
    return C * np.power(x, alpha) * np.power(length, -beta) + b


def check_capacity(capacity: str) -> None:
    if capacity not in CAPACITIES:
        raise LawError(f"capacity must be 'rank' or 'params', not {capacity!r}")


# --------------------------------------------------------------------------------------------- points


@dataclass(frozen=True)
class Point:
    """One run: capacity x, answer length l and the loss drop delta_l (with the losses when known)."""

    x: float
    length: float
    delta_l: float
    l_final: float | None = None
    l_init: float | None = None
    rank: float | None = None
    params: float | None = None
    method: str | None = None
    exact_match: float | None = None  # the share of entries greedy decoding recalls exactly, when known
    source: str = ""
    capacity: str = "rank"  # what x measures: "rank" or "params"

    @property
    def saturated(self) -> bool:
        return self.l_final is not None and self.l_final <= LN2

    def to_row(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and k != "capacity"}


@dataclass(frozen=True)
class Dropped:
    point: Point
    reason: str


def load_points(inputs: Sequence[Path | str], capacity: str = "rank") -> list[Point]:
    """Read runs from sweep folders, run folders, summary.json files and CSV/JSONL tables."""
    check_capacity(capacity)
    if not inputs:
        raise LawError("no input given: pass a sweep folder, run folders, or a CSV/JSONL table")
    points: list[Point] = []
    seen: set[Path] = set()
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            summaries = _find_summaries(path)
            if not summaries:
                raise LawError(f"{path}: no {runs.SUMMARY} found (looked in the folder and two levels below)")
            for summary in summaries:
                if summary.resolve() not in seen:
                    seen.add(summary.resolve())
                    points.append(_read_summary(summary, capacity))
        elif path.is_file():
            suffix = path.suffix.lower()
            if path.name == runs.SUMMARY:
                if path.resolve() not in seen:
                    seen.add(path.resolve())
                    points.append(_read_summary(path, capacity))
            elif suffix == ".csv":
                points.extend(_read_csv(path, capacity))
            elif suffix in (".jsonl", ".ndjson"):
                points.extend(_read_jsonl(path, capacity))
            else:
                raise LawError(f"{path}: not a sweep folder, run folder, summary.json, .csv or .jsonl file")
        else:
            raise LawError(f"{path}: no such file or folder")
    return points


# What a sweep varies per cell (the seed: per replicate of a cell), and what does not change what a run learns:
# not part of the law's settings.
_PER_CELL = ("corpus", "rank", "answer_tokens", "seed")
BOOKKEEPING = ("gguf", "check_every", "gate_checks", "checkpoint_every", "log_every", "device",
               "allow_conflicting_keys")


def shared_settings(points: Iterable[Point]) -> tuple[dict[str, Any], list[str]]:
    """The training settings every fitted run has in common (read from the config.yaml beside each run's summary),
    which a law assumes; and the names of the settings in which the runs differ. Table rows carry none."""
    common: dict[str, Any] | None = None
    differing: set[str] = set()
    for point in points:
        folder = Path(point.source).parent
        if not point.source.endswith(runs.SUMMARY) or not runs.is_run(folder):
            continue
        try:
            settings = runs.read_settings(folder)
        except UserError:
            continue
        settings = {k: v for k, v in complete_settings(settings).items() if k not in _PER_CELL + BOOKKEEPING}
        if common is None:
            common = settings
            continue
        for key in set(common) | set(settings):
            if common.get(key) != settings.get(key):
                differing.add(key)
    common = {k: v for k, v in (common or {}).items() if k not in differing}
    return common, sorted(differing)


def _find_summaries(folder: Path) -> list[Path]:
    """The folder's own summary (a run folder), else those of the runs one or two levels below (a sweep)."""
    own = folder / runs.SUMMARY
    if own.is_file():
        return [own]
    found = set(folder.glob(f"*/{runs.SUMMARY}")) | set(folder.glob(f"*/*/{runs.SUMMARY}"))
    return sorted(p for p in found if p.is_file())


def _read_summary(path: Path, capacity: str) -> Point:
    try:
        data = runs.read_summary(path)
    except UserError as exc:
        raise LawError(str(exc)) from None
    if data is None:
        raise LawError(f"{path}: no such file")
    return _make_point(data, capacity, str(path), length_keys=("answer_tokens", "length"))


def _read_csv(path: Path, capacity: str) -> list[Point]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None:
                raise LawError(f"{path}: empty file")
            reader.fieldnames = [name.strip().lower() for name in reader.fieldnames]
            _check_columns(path, reader.fieldnames, capacity)
            points = []
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row:
                    raise LawError(f"{where}: more values than columns")
                if all(v is None or not v.strip() for v in row.values()):
                    continue
                points.append(_make_point(row, capacity, where, length_keys=_LENGTH_COLUMNS))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LawError(f"{path}: cannot read ({exc})") from None
    if not points:
        raise LawError(f"{path}: no data rows")
    return points


def _read_jsonl(path: Path, capacity: str) -> list[Point]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LawError(f"{path}: cannot read ({exc})") from None
    points = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LawError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise LawError(f"{where}: expected a JSON object")
        _check_columns(where, list(row), capacity)
        points.append(_make_point(row, capacity, where, length_keys=_LENGTH_COLUMNS))
    if not points:
        raise LawError(f"{path}: no data rows")
    return points


def _check_columns(where: Path | str, columns: Iterable[str], capacity: str) -> None:
    columns = set(columns)
    missing = []
    if capacity not in columns:
        missing.append(capacity)
    if not columns.intersection(_LENGTH_COLUMNS):
        missing.append("length (or answer_tokens)")
    if "delta_l" not in columns and not {"l_init", "l_final"} <= columns:
        missing.append("delta_l")
    if missing:
        hint = ""
        other = "rank" if capacity == "params" else "params"
        if capacity in missing and other in columns:
            hint = f"; it has '{other}': use --capacity {other}"
        raise LawError(f"{where}: missing column(s) {', '.join(missing)}{hint}")


def _number(row: dict, key: str, where: str, required: bool) -> float | None:
    value = row.get(key)
    if isinstance(value, str):
        value = value.strip()
        if value == "":
            value = None
    if value is None:
        if required:
            raise LawError(f"{where}: missing value for '{key}'")
        return None
    if isinstance(value, bool):
        raise LawError(f"{where}: '{key}' must be a number, not {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LawError(f"{where}: '{key}' must be a number, not {value!r}") from None
    if not math.isfinite(number):
        raise LawError(f"{where}: '{key}' must be finite, not {value!r}")
    return number


def _make_point(row: dict, capacity: str, where: str, length_keys: Sequence[str]) -> Point:
    length_key = next((k for k in length_keys if k in row), length_keys[0])
    x = _number(row, capacity, where, required=True)
    length = _number(row, length_key, where, required=True)
    l_init = _number(row, "l_init", where, required=False)
    l_final = _number(row, "l_final", where, required=False)
    delta_l = _number(row, "delta_l", where, required=l_init is None or l_final is None)
    if delta_l is None:
        delta_l = l_init - l_final
    if l_final is None and l_init is not None:
        l_final = l_init - delta_l
    if x <= 0:
        raise LawError(f"{where}: '{capacity}' must be positive, not {x:g}")
    if length <= 0:
        raise LawError(f"{where}: '{length_key}' must be positive, not {length:g}")
    rank = _number(row, "rank", where, required=False)
    params = _number(row, "params", where, required=False)
    method = row.get("method")
    exact = _number(row, "exact_match", where, required=False)
    return Point(x=x, length=length, delta_l=delta_l, l_final=l_final, l_init=l_init, rank=rank,
                 params=params, method=str(method) if method is not None else None, exact_match=exact,
                 source=where, capacity=capacity)


# ------------------------------------------------------------------------------------ what can be fitted


def recall_loss(points: Iterable[Point], share: float = 0.95,
                loss: Callable[[Point], float | None] = lambda p: p.l_final) -> float | None:
    """The largest loss at or under which every run with a known exact match recalled at least `share` of its
    entries: the loss a plan must reach for that recall, as these runs measured it (None: no run got there).
    `loss` says which loss: the run's measured L_final by default, or e.g. the L_final a law predicts for it."""
    pairs = ((loss(p), p.exact_match) for p in points if p.exact_match is not None)
    known = sorted((value, exact) for value, exact in pairs if value is not None)  # at a tie the failed run first
    level = None
    for value, exact in known:
        if exact < share:
            break
        level = value
    return level


def recall_frontier(points: Iterable[Point], share: float = 0.95) -> list[list[float | None]]:
    """Per measured length (ascending): the smallest capacity x at which every run of that length with capacity x
    or more recalled at least `share` of its entries (seeds of a cell all count), or None where no capacity did.
    What the runs themselves say about recall, without the law: a plan for a length between two measured ones
    can rely on the longer one's frontier, as a shorter value is the easier one."""
    by_length: dict[float, list[Point]] = {}
    for p in points:
        if p.exact_match is not None:
            by_length.setdefault(p.length, []).append(p)
    frontier = []
    for length in sorted(by_length):
        runs_here = by_length[length]
        x = None
        for candidate in sorted({p.x for p in runs_here}, reverse=True):
            if all(p.exact_match >= share for p in runs_here if p.x >= candidate):
                x = candidate
            else:
                break
        frontier.append([length, x])
    return frontier


def split_saturated(points: Iterable[Point]) -> tuple[list[Point], list[Dropped]]:
    """Separate the runs the law applies to from saturated ones (L_final <= ln 2)."""
    kept: list[Point] = []
    dropped: list[Dropped] = []
    for point in points:
        if point.saturated:
            reason = f"saturated: L_final {point.l_final:.4g} <= ln 2 ({LN2:.4f})"
            dropped.append(Dropped(point, reason))
        else:
            kept.append(point)
    return kept, dropped


def check_fittable(points: Sequence[Point]) -> None:
    """Raise LawError unless the points can determine the law's four coefficients."""
    if not points:
        raise LawError("no usable runs to fit (all were dropped as saturated, or none were given)")
    lengths = {p.length for p in points}
    capacities = {p.x for p in points}
    cells = {(p.x, p.length) for p in points}
    if len(cells) < N_PARAMETERS + 1:
        raise LawError(f"only {len(cells)} distinct (capacity, length) point(s) are usable; the law has "
                       f"{N_PARAMETERS} coefficients, so at least {N_PARAMETERS + 1} are needed")
    if len(lengths) < 2:
        raise LawError(f"all usable runs have the same length ({next(iter(lengths)):g} tokens); "
                       "the length exponent beta needs at least two lengths")
    if len(capacities) < 2:
        raise LawError(f"all usable runs have the same capacity ({next(iter(capacities)):g}); "
                       "the capacity exponent alpha needs at least two")
    if all(p.delta_l <= 0 for p in points):
        raise LawError("every usable run has delta_l <= 0: training never lowered the loss, nothing to fit")
