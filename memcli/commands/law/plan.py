"""Planning with a fitted law (docs/method.md §5): the smallest capacity whose predicted
L_final = L_init - delta_l(x, l) is at most ln 2 minus a margin, its bootstrap interval, notes when the answer
extrapolates beyond the fitted runs, and the sentence `memcli plan` prints.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from memcli.commands.law.fit import LawFit, load_law
from memcli.commands.law.points import BOOKKEEPING, GOAL, MARGIN, LawError, law_value
from memcli.core import models
from memcli.core.runs import json_safe
from memcli.core.scoring import LN2
from memcli.training.config import BEFORE, TrainConfig


def predict(law: LawFit, x, length):
    """Predicted delta_l at capacity x and answer length l (numpy broadcasting)."""
    return law_value(np.asarray(x, dtype=float), np.asarray(length, dtype=float), *law.coefficient_tuple())


@dataclass
class Plan:
    """The answer to "how big an adapter does this corpus need?"."""

    capacity: str
    length: float
    l_init: float
    margin: float
    target_l_final: float
    target_source: str  # why that target: ln 2 - margin, or the loss the law's runs recalled at
    status: str  # "ok" | "minimum" | "unreachable" | "exceeds_max"
    x: int | None
    rank: int | None
    params: int | None
    predicted_delta_l: float | None
    predicted_l_final: float | None
    interval: list[int | None] | None  # capacity units; None at an end means "beyond the maximum"
    level: float
    extrapolation: list[str]
    sentence: str
    l_init_source: str | None = None
    params_per_rank: float | None = None
    l_final_interval: list[float] | None = None  # the predicted L_final at the answer, over the bootstrap
    settings: dict[str, Any] | None = None  # the training settings the law (and so this answer) assumes
    train_rank: int | None = None  # the rank to train (see _train_rank) and why that one
    train_reason: str | None = None
    frontier_rank: int | None = None  # the smallest rank the law's own runs recalled at, at frontier_length
    frontier_length: float | None = None
    held_out: dict[str, Any] | None = None  # the law's own check: fitted without its longest length, its error there

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


def _required_x(need: float, length: float, coefficients: Sequence[float], x_min: float) -> float:
    """Smallest real capacity with predicted delta_l >= need (x_min when any will do, inf when none)."""
    C, alpha, beta, b = coefficients
    if need <= law_value(x_min, length, C, alpha, beta, b):
        return x_min
    if C <= 0 or alpha <= 0:
        return math.inf
    with np.errstate(over="ignore", divide="ignore"):
        x = ((need - b) / (C * length ** (-beta))) ** (1.0 / alpha)
    return max(float(x), x_min)


def _smallest_integer(need: float, length: float, coefficients: Sequence[float], x_real: float,
                      x_min: int) -> int:
    """Round a real solution up to an integer and correct it for floating-point error."""
    x = max(math.ceil(x_real - 1e-9 * x_real), x_min)
    for _ in range(3):
        if x > x_min and law_value(x - 1, length, *coefficients) >= need:
            x -= 1
    for _ in range(3):
        if law_value(x, length, *coefficients) < need:
            x += 1
    return x


def plan(law: LawFit, length: float, l_init: float, margin: float = MARGIN, max_rank: int = 4096,
         params_per_rank: float | None = None, capacity: str | None = None,
         l_init_source: str | None = None, extrapolate: bool = False, goal: str = GOAL) -> Plan:
    """The smallest capacity whose predicted L_final = l_init - delta_l(x, l) is at most the target: ln 2 - margin
    (goal "loss", the paper's), or with goal "recall" the lower of that and the predicted L_final under which every
    run of the law recalled at least 95 % of its entries (when the law knows it); with goal "recall" the rank to
    train is also at least the law's recall frontier at the next measured length. A length outside the lengths the
    law's runs measured is refused (LawError) unless `extrapolate`, and so is an answer above the largest capacity
    they measured or a length whose next measured length no run recalled."""
    if goal not in ("recall", "loss"):
        raise LawError(f"the goal must be recall or loss, not {goal!r}")
    if capacity is not None and capacity != law.capacity:
        raise LawError(f"the law was fitted with capacity measured in {law.capacity}, not {capacity}")
    for name, value in (("answer length", length), ("L_init", l_init)):
        try:
            valid = math.isfinite(float(value)) and float(value) > 0
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise LawError(f"the {name} must be a positive number, not {value!r}")
    length, l_init = float(length), float(l_init)
    if not 0 <= margin < LN2:
        raise LawError(f"the margin must lie in [0, ln 2), not {margin}")
    if max_rank < 1:
        raise LawError(f"max rank must be at least 1, not {max_rank}")

    l_low, l_high = law.measured_l_range or law.l_range
    if not extrapolate and not l_low <= length <= l_high:
        raise LawError(f"{length:,.0f} answer tokens is outside the lengths this law was measured on "
                       f"({l_low:,.0f} to {l_high:,.0f}): its answer would be a guess. Pass --extrapolate to see "
                       "it anyway, or fit a law on a sweep that covers this length")

    per_rank = params_per_rank if params_per_rank is not None else law.params_per_rank
    if law.capacity == "rank":
        x_min, x_max, unit = 1, max_rank, "rank"
    else:
        x_min = int(math.ceil(per_rank)) if per_rank else 1
        x_max = max_rank * per_rank if per_rank else math.inf
        unit = "parameter count"
    target, target_source = LN2 - margin, f"ln 2 - {margin:g}"
    if goal == "recall" and law.recall_predicted_l_final is not None:
        if law.recall_predicted_l_final < target:
            target = law.recall_predicted_l_final
            target_source = ("the predicted L_final under which every run of this law recalled >= 95 % of its "
                             "entries: on the law's own scale, so its bias near saturation is included")
        else:
            target_source += " (every run of this law predicted under it recalled >= 95 % of its entries)"
    elif goal == "recall" and law.recall_l_final is not None and law.recall_l_final < target:
        target = law.recall_l_final
        target_source = "the loss under which every run of this law recalled >= 95 % of its entries"
    elif goal == "recall":
        target_source += " (the law's runs give no lower loss for 95 % recall)"
    need = l_init - target
    coefficients = law.coefficient_tuple()

    x_real = _required_x(need, length, coefficients, x_min)
    if math.isinf(x_real):
        status, x = "unreachable", None
    elif x_real > x_max:
        status, x = "exceeds_max", None
    else:
        x = _smallest_integer(need, length, coefficients, x_real, x_min)
        status = "minimum" if x == x_min else "ok"
        if x > x_max:
            status, x = "exceeds_max", None

    x_high = (law.measured_x_range or law.x_range)[1]
    if not extrapolate and x is not None and x > x_high:
        raise LawError(f"the law answers {unit} {x:,} for {length:,.0f} answer tokens, above the largest {unit} its "
                       f"runs measured ({x_high:,.0f}): a guess, and near full recall the law is optimistic. Pass "
                       "--extrapolate to see it anyway; or train with a larger budget, or fit a law on a sweep with "
                       "higher ranks")

    rank = params = None
    if x is not None:
        if law.capacity == "rank":
            rank = x
            params = int(round(x * per_rank)) if per_rank else None
        else:
            params = x
            rank = int(math.ceil(x / per_rank - 1e-9)) if per_rank else None

    predicted = float(law_value(x, length, *coefficients)) if x is not None else None
    interval = _plan_interval(law, need, length, x_min, x_max)
    extrapolation = _extrapolation_notes(law, x, length, unit)
    if law.r2 is not None and law.r2 < 0.9:
        extrapolation.insert(0, f"This law fits its own runs poorly (R^2 {law.r2:.2f}, MAPE {law.mape:.1f} %): its "
                                "answer is a rough guess.")
    # alpha at its lower bound 0 with C -> inf: C r^alpha tends to C + C alpha ln r, a law in the logarithm of r
    if extrapolation and any(b.startswith("alpha at its lower bound") for b in law.convergence.get("at_bound", [])):
        extrapolation.append(f"The law's alpha fell to 0: over its runs delta_l follows the logarithm of {unit}, "
                             "not a power of it, so an answer this far out is unreliable.")
    result = Plan(capacity=law.capacity, length=float(length), l_init=float(l_init), margin=float(margin),
                  target_l_final=target, target_source=target_source, status=status, x=x, rank=rank, params=params,
                  predicted_delta_l=predicted,
                  predicted_l_final=l_init - predicted if predicted is not None else None,
                  interval=interval, level=law.level, extrapolation=extrapolation, sentence="",
                  l_init_source=l_init_source, params_per_rank=per_rank,
                  l_final_interval=_l_final_interval(law, x, length, l_init), settings=dict(law.settings),
                  held_out=dict(law.extrapolation))
    if goal == "recall":
        result.frontier_length, result.frontier_rank = _frontier(law, length, per_rank, x_high, extrapolate)
    result.train_rank, result.train_reason = _train_rank(result)
    result.sentence = _plan_sentence(result, law, need, x_real, x_max)
    return result


def _plan_interval(law: LawFit, need: float, length: float, x_min: float,
                   x_max: float) -> list[int | None] | None:
    samples = law.bootstrap_array()
    if samples.shape[0] == 0:
        return None
    required = np.array([_required_x(need, length, row, x_min) for row in samples])
    tail = (1 - law.level) / 2
    ends = [float(np.quantile(required, tail, method="lower")),
            float(np.quantile(required, 1 - tail, method="higher"))]
    return [None if (math.isinf(v) or v > x_max) else max(int(math.ceil(v - 1e-9 * v)), int(x_min))
            for v in ends]


def _frontier(law: LawFit, length: float, per_rank: float | None, x_high: float,
              extrapolate: bool) -> tuple[float | None, int | None]:
    """(measured length, rank) from the law's recall frontier: at the shortest length it measured that is at
    least this one, the smallest rank at which all its runs recalled. A law with a frontier in which no rank
    recalled at that length is refused (LawError) unless `extrapolate`: none of its runs says which rank would."""
    if not law.recall_frontier:
        return None, None
    at_or_above = [(n, x) for n, x in law.recall_frontier if n >= length]
    if not at_or_above:
        return None, None
    measured, x = at_or_above[0]
    if x is None:
        if extrapolate:
            return measured, None
        raise LawError(f"no run of this law recalled a value of {measured:,.0f} tokens (the shortest length it "
                       f"measured at or above {length:,.0f}) at any {law.capacity} up to {x_high:,.0f}, so none "
                       "says which would recall this one. Pass --extrapolate for the law's guess; or train with a "
                       "larger budget, or fit a law on a sweep with higher ranks")
    if law.capacity == "params":
        x = math.ceil(x / per_rank - 1e-9) if per_rank else None
    return measured, int(x) if x is not None else None


def _train_rank(p: Plan) -> tuple[int | None, str | None]:
    """The rank to train, and why: the largest of the point estimate, the upper end of its bootstrap interval and
    the recall frontier's rank. Near full recall the law is optimistic: the runs it drops as saturated all sit
    above its curve (their loss cannot fall below 0 as the law's can), and on new values the point estimate and
    even the interval's end fell short where the frontier held (docs/measurements.md, "The memory law of the default
    model")."""
    if p.rank is None:
        return None, None
    rank, reason = p.rank, None
    if p.interval is not None and p.interval[1] is not None:
        high = p.interval[1]
        if p.capacity == "params":
            high = math.ceil(high / p.params_per_rank - 1e-9) if p.params_per_rank else p.rank
        if high > rank:
            rank = int(high)
            reason = "the interval's upper end: near full recall the law's point estimate is optimistic"
    if p.frontier_rank is not None and p.frontier_rank > rank:
        rank = p.frontier_rank
        reason = (f"the smallest rank at which every run of the law at {p.frontier_length:,.0f} answer tokens "
                  "recalled its value: near full recall the law is optimistic")
    return rank, reason


def _l_final_interval(law: LawFit, x: int | None, length: float, l_init: float) -> list[float] | None:
    """The predicted L_final at capacity x over the bootstrap samples, at the law's interval level."""
    samples = law.bootstrap_array()
    if x is None or samples.shape[0] == 0:
        return None
    l_final = l_init - np.array([law_value(x, length, *row) for row in samples])
    tail = (1 - law.level) / 2
    return [float(np.quantile(l_final, tail)), float(np.quantile(l_final, 1 - tail))]


# The settings a reader of a plan needs to see even at their defaults: what decides how much a run memorises.
KEY_SETTINGS = ("model", "method", "lr", "batch_size", "dropout")
# A setting the law predates has the value its runs had; bookkeeping (when checks run, what is written) is not
# part of a law, so a planned run takes train's own.
PREDATES = {k: v for k, v in BEFORE.items() if k not in BOOKKEEPING}


def assumed_settings(settings: dict[str, Any]) -> str:
    """The law's settings in one line: the key ones, the budget, and every other one not at train's default."""
    defaults = asdict(TrainConfig())
    settings = PREDATES | settings
    budget = ("max_steps",) if settings.get("max_steps") is not None else ("epochs",)
    shown = [k for k in KEY_SETTINGS + budget if k in settings]
    shown += [k for k, v in settings.items() if k not in shown and k in defaults and v != defaults[k]]
    text = ", ".join(f"{k}={settings[k]}" for k in shown)
    if settings.get("layers") is None and settings.get("modules") is None:
        text += ", placement: the middle layer's MLP"
    return text


def train_command(settings: dict[str, Any], rank: int, corpus: str = "CORPUS", out: str = "runs/planned") -> str:
    """The `memcli train` command line that trains with the law's settings at this rank: every setting the law
    records, spelled as its option whatever train's default is, so that the command reproduces them exactly after
    a later change of defaults (a setting left unset, such as the placement, is train's own; one the law predates
    is the value its runs had, config.BEFORE)."""
    defaults = asdict(TrainConfig())
    words = ["memcli", "train", shlex.quote(corpus), "--out", shlex.quote(out), "--rank", str(rank)]
    for key, value in (PREDATES | settings).items():
        if key not in defaults or key in ("rank", "corpus"):
            continue
        option = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            words.append(option if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            words += [option, ",".join(map(str, value))]
        elif value is not None:
            words += [option, shlex.quote(str(value))]  # a shell word: an empty key, a system prompt's spaces
    return " ".join(words)


def _extrapolation_notes(law: LawFit, x: int | None, length: float, unit: str) -> list[str]:
    notes = []
    x_low, x_high = law.measured_x_range or law.x_range
    l_low, l_high = law.measured_l_range or law.l_range
    if x is not None and x > x_high:
        notes.append(f"The answer extrapolates: {unit} {x:,} is above the largest {unit} measured ({x_high:,.0f}).")
    elif x is not None and x < x_low:
        notes.append(f"The answer extrapolates: {unit} {x:,} is below the smallest {unit} measured ({x_low:,.0f}).")
    if length > l_high:
        notes.append(f"The length extrapolates: {length:,.0f} answer tokens is longer than the longest measured "
                     f"({l_high:,.0f}).")
    elif length < l_low:
        notes.append(f"The length extrapolates: {length:,.0f} answer tokens is shorter than the shortest measured "
                     f"({l_low:,.0f}).")
    return notes


def _describe(p: Plan) -> str:
    if p.capacity == "rank":
        return f"rank {p.rank}" + (f" ({p.params:,} parameters)" if p.params is not None else "")
    if p.rank is None:
        return f"{p.params:,} parameters"
    return f"{p.params:,} parameters (rank {p.rank}, which has {round(p.rank * p.params_per_rank):,})"


def _plan_sentence(p: Plan, law: LawFit, need: float, x_real: float, x_max: float) -> str:
    goal = (f"a predicted L_final <= {p.target_l_final:.3f} nats ({p.target_source}) "
            f"for {p.length:,.0f} answer tokens starting from L_init {p.l_init:.3f}")
    unit = "rank" if p.capacity == "rank" else "parameter count"
    if p.status == "ok":
        return (f"The smallest adapter that reaches {goal} is {_describe(p)}: "
                f"predicted delta_l {p.predicted_delta_l:.3f}, L_final {p.predicted_l_final:.3f}.")
    if p.status == "minimum":
        what = _describe(p)
        if need <= 0:
            why = "the base model's L_init is already below the target"
        elif need <= law.b:
            why = (f"the law's constant b = {law.b:.3f} alone covers the {need:.3f} nats needed, so the answer "
                   "does not depend on capacity; treat it with caution")
        else:
            why = f"it is predicted to lower the loss by {p.predicted_delta_l:.3f} nats, {need:.3f} are needed"
        return f"The smallest adapter, {what}, already reaches {goal}: {why}."
    if p.status == "unreachable":
        return (f"No {unit} reaches {goal}: the fitted law's delta_l does not grow with capacity "
                f"(C = {law.C:.3g}, alpha = {law.alpha:.3g}), so it saturates at b = {law.b:.3f} nats, "
                f"short of the {need:.3f} nats needed.")
    at_max = float(law_value(x_max, p.length, *law.coefficient_tuple()))
    limit = f"rank {x_max:,.0f}" if p.capacity == "rank" else f"{x_max:,.0f} parameters"
    return (f"No adapter up to {limit} reaches {goal}: it would need {unit} ~{x_real:,.0f} "
            f"(delta_l {need:.3f} nats needed, {at_max:.3f} predicted at the maximum).")


def choose_law(law: str | None, model: str | None, entries: int | None) -> tuple[Path, str | None]:
    """The law file `memcli plan` uses, and why when it was not given as a path: --law PATH; --law KIND (a law
    shipped for the model: phonebook | random); or, with neither, the model's shipped law for the corpus's shape
    (one value: random, the law of the hardest single value; several entries: phonebook)."""
    if law is not None and (Path(law).suffix == ".json" or Path(law).exists()):
        return Path(law), None
    spec = models.resolve(model)
    shipped = models.shipped_laws(spec)
    if law is None and entries is None:
        raise LawError("with --tokens, name the law: --law law.json, or a law shipped for the model "
                       f"({' | '.join(shipped) or 'none for ' + spec.name})")
    kind = law or ("random" if entries == 1 else "phonebook")
    if kind not in shipped:
        missing = spec.info.get("laws_missing", {}).get(kind)
        have = f"it ships {', '.join(shipped)}" if shipped else "memcli ships no law for it"
        why = f": {missing}" if missing else ""
        raise LawError(f"no {kind} law ships for model {spec.name}{why} ({have}). Fit one on this corpus with "
                       "--probe, or on corpora like yours with `memcli sweep` and `memcli fit`, then pass --law "
                       "law.json")
    why = f"the {kind} law shipped for {spec.name}"
    if law is None:
        why += " (chosen by the corpus's shape: " + ("one value" if entries == 1 else f"{entries} entries") + ")"
    return shipped[kind], why


def plan_from_file(law_path: Path | str, tokens: int | None, l_init: float | None, margin: float = MARGIN, *,
                   capacity: str | None = None, max_rank: int = 4096, params_per_rank: float | None = None,
                   l_init_source: str | None = None, extrapolate: bool = False, goal: str = GOAL) -> Plan:
    """`memcli plan` without the printing: answer "which adapter does this corpus need?" from a law file.

    tokens and l_init come from the command line, or are measured on a corpus by the caller, which then
    says where L_init came from in l_init_source (e.g. "measured on corpus.jsonl with the base model").
    Without an L_init, the median L_init of the runs the law was fitted on is used, and the answer says so.
    """
    law = load_law(law_path, capacity=capacity)
    if tokens is None:
        raise LawError("give the corpus's answer length with --tokens (or pass the corpus itself)")
    if l_init is None:
        if law.l_init_median is None:
            raise LawError(f"{law_path}: the fitted runs carry no L_init; give --l-init (or pass the corpus)")
        l_init = law.l_init_median
        l_init_source = f"the median L_init of the runs in {law_path}, not measured on this corpus"
    return plan(law, tokens, l_init, margin=margin, max_rank=max_rank, params_per_rank=params_per_rank,
                l_init_source=l_init_source, extrapolate=extrapolate, goal=goal)
