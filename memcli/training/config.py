"""Training settings: every `memcli train` setting with its default, its type and its check, read from the
defaults, a YAML file and the command line (in that order of precedence); and the comparison of settings by what
they resolve to (for --resume and sweeps). `examples/train.yaml` lists the same settings with their defaults."""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from memcli.core.errors import UserError
from memcli.core.models import DEFAULT_MODEL, cuda_available
from memcli.core.quants import parse_quants
from memcli.llama.sampler import Sampler, sampler_of

METHODS = ("sft", "memft-ot", "memft-sw")
GGUF_MODES = ("auto", "require", "off")
SCHEDULES = ("linear", "constant", "cosine")
INITS = ("default", "gaussian")
# Settings that do not change what a run trains: a resumed run or a sweep cell may differ in them.
OUTPUT_ONLY = ("gguf",)
# Settings added after runs were first recorded, with the value that does what a run recorded before them did:
# a config.yaml or law.json that lacks one trained with this value, whatever train's default is now.
BEFORE = {"tail_threshold": 0.5, "schedule": "linear", "warmup_steps": 0, "lora_plus": 1.0, "rslora": False,
          "init": "default", "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8,
          "gate_checks": False, "tail_lr": 1.0}


@dataclass
class TrainConfig:
    corpus: str = ""
    model: str = DEFAULT_MODEL
    # corpus
    key: str = ""
    chat_template: bool = False
    eos: bool = False  # with chat_template: the template's end-of-turn token (the default with chat_template)
    system_prompt: str | None = None  # with chat_template: a system message (None: none, the template's default)
    answer_tokens: int | None = None
    # objective
    method: str = "memft-ot"
    no_hard_tokens: str = "fallback"  # memft-ot: fallback (SFT step) | skip
    train_threshold: float = 0.5  # memft-ot: train tokens while p <= this (0.5: the paper); certify at p > 0.5
    floor: float = 0.0  # memft-ot: the weight a token above train_threshold keeps (0: the paper)
    tail_threshold: float = 0.9  # memft-ot in the tail: train tokens while p <= this
    tail_from: float = 0.9  # the tail starts when a clean check finds this share of answer tokens at p > 0.5
    tail_lr: float = 0.5  # the learning rate is multiplied by this while the run is in its tail
    sw_form: str = "auto"  # memft-sw: auto | spatial | temporal
    curriculum_epochs: list[int] = field(default_factory=lambda: [20, 40, 60, 80])
    # adapter
    rank: int = 8
    layers: list[int] | None = None
    modules: list[str] | None = None
    alpha: float | None = None
    dropout: float = 0.0
    rslora: bool = False  # scale the adapter by alpha / sqrt(rank) instead of alpha / rank
    init: str = "default"  # A's initialisation: default (Kaiming-uniform) | gaussian; B starts at zero
    # preserve: keep the base's next-token distribution on unrelated text (memcli.training.preserve)
    preserve: bool = False
    preserve_weight: float = 100.0
    preserve_text: str | None = None
    # optimiser
    lr: float = 1e-2
    schedule: str = "linear"  # linear (to 0 at the budget) | constant | cosine (to 0 at the budget)
    warmup_steps: int = 0
    lora_plus: float = 1.0  # LoRA+: B's learning rate is lr x this
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    clip: float = 1.0
    epochs: int = 200
    max_steps: int | None = None
    batch_size: int = 8
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    # stopping, logging
    until_recall: bool = False
    check_every: int = 10
    gate_checks: bool = True  # skip clean checks while the latest training passes are short of tail_from
    checkpoint_every: int = 50
    log_every: int = 1
    # deployment
    deploy: str | None = None  # llama.cpp file types (e.g. f16,q4_k_m): train so that recall holds in their files
    margin: float = 0.0  # certify a token only when its logit leads the runner-up's by this (memft-ot trains it)
    # the runner's decoding (memcli.llama.sampler): trained for, and certified under it and under plain greedy
    sampler: str = "greedy"
    repeat_penalty: float | None = None  # None: the preset's
    repeat_last_n: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    # output
    gguf: str = "auto"  # adapter.gguf: auto (when the model can be exported) | require | off
    # corpus checks
    allow_conflicting_keys: bool = False  # train on a corpus with a key given two different values

    def deploy_types(self) -> list[str]:
        """The llama.cpp file types of --deploy (none without it)."""
        return self.deploy.split(",") if self.deploy else []

    def decoding(self) -> Sampler:
        """The runner's sampler this run is trained and certified for (the preset with any penalty given)."""
        return sampler_of(dataclasses.asdict(self))

    @classmethod
    def from_sources(cls, yaml_path: Path | None, overrides: dict) -> "TrainConfig":
        """Defaults, then the YAML file, then the command line. Every value is checked against its field's type
        (see `coerce_setting`), so a mistyped setting ends in one line naming it and where it came from."""
        values: dict = {}
        origin: dict = {}
        if yaml_path is not None:
            try:
                loaded = yaml.safe_load(Path(yaml_path).read_text(encoding="utf-8-sig")) or {}
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"--config {yaml_path}: cannot be read ({first})") from None
            if not isinstance(loaded, dict):
                raise UserError(f"--config {yaml_path}: expected a mapping of settings")
            for k, v in loaded.items():
                name = str(k).replace("-", "_")
                values[name], origin[name] = v, f"--config {yaml_path}: setting '{k}'"
        for k, v in overrides.items():
            if v is not None:
                values[k], origin[k] = v, f"--{k.replace('_', '-')}"
        if values.get("chat_template") is True and "eos" not in values:  # a served answer stops at the end of turn
            values["eos"], origin["eos"] = True, "--chat-template"
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown setting(s): {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        values = {k: coerce_setting(v, hints[k], origin[k]) for k, v in values.items()}
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        checks = [
            (self.method in METHODS, f"--method must be one of {', '.join(METHODS)}, got '{self.method}'"),
            (self.no_hard_tokens in ("fallback", "skip"), "--no-hard-tokens must be fallback or skip"),
            (0.5 <= self.train_threshold < 1, f"--train-threshold must be in [0.5, 1), got {self.train_threshold}"),
            (0 <= self.floor <= 1, f"--floor must be in [0, 1], got {self.floor}"),
            (0.5 <= self.tail_threshold < 1, f"--tail-threshold must be in [0.5, 1), got {self.tail_threshold}"),
            (0 <= self.tail_from <= 1, f"--tail-from must be in [0, 1], got {self.tail_from}"),
            (0 < self.tail_lr <= 1, f"--tail-lr must be in (0, 1], got {self.tail_lr}"),
            (self.sw_form in ("auto", "spatial", "temporal"), "--sw-form must be auto, spatial or temporal"),
            (self.rank >= 1, f"--rank must be at least 1, got {self.rank}"),
            (0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be at least 1"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.check_every >= 1 and self.checkpoint_every >= 1 and self.log_every >= 1,
             "--check-every, --checkpoint-every and --log-every must be at least 1"),
            (self.dtype in ("auto", "float32", "bfloat16", "float16"),
             "--dtype must be auto, float32, bfloat16 or float16"),
            (self.gguf in GGUF_MODES, f"--gguf must be one of {', '.join(GGUF_MODES)}, got '{self.gguf}'"),
            (math.isfinite(self.lr) and math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             f"--lr and --weight-decay must be finite (and --weight-decay >= 0), got {self.lr} and "
             f"{self.weight_decay}"),
            (self.alpha is None or (math.isfinite(self.alpha) and self.alpha > 0),
             f"--alpha must be positive, got {self.alpha}"),
            (self.clip > 0, f"--clip must be positive, got {self.clip}"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}, got '{self.schedule}'"),
            (self.init in INITS, f"--init must be one of {', '.join(INITS)}, got '{self.init}'"),
            (self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}"),
            (math.isfinite(self.lora_plus) and self.lora_plus > 0, f"--lora-plus must be positive, got "
             f"{self.lora_plus}"),
            (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, f"--adam-beta1 and --adam-beta2 must be in "
             f"[0, 1), got {self.adam_beta1} and {self.adam_beta2}"),
            (math.isfinite(self.adam_eps) and self.adam_eps > 0, f"--adam-eps must be positive, got {self.adam_eps}"),
            (math.isfinite(self.margin) and self.margin >= 0, f"--margin must be >= 0, got {self.margin}"),
            (self.answer_tokens is None or self.answer_tokens >= 1,
             f"--answer-tokens must be at least 1, got {self.answer_tokens}"),
            (len(self.curriculum_epochs) >= 1 and self.curriculum_epochs[0] >= 1
             and all(a < b for a, b in zip(self.curriculum_epochs, self.curriculum_epochs[1:])),
             "--curriculum-epochs must be increasing positive integers (e.g. 20,40,60,80), got "
             f"{','.join(map(str, self.curriculum_epochs)) or 'nothing'}"),
            (self.modules is None or len(self.modules) >= 1, "--modules must name at least one module"),
            (self.preserve_weight > 0, f"--preserve-weight must be positive, got {self.preserve_weight}"),
            (self.preserve or self.preserve_text is None, "--preserve-text is the replay text of --preserve; "
             "add --preserve"),
            (self.chat_template or self.system_prompt is None, "--system-prompt is the system message of "
             "--chat-template; add --chat-template"),
        ]
        if self.deploy is not None:
            self.deploy = ",".join(parse_quants(self.deploy, "--deploy"))
        self.decoding()  # a bad preset or penalty ends here
        for ok, message in checks:
            if not ok:
                raise UserError(message)


def lr_factor(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate at optimiser step `step` (0-based) as a fraction of --lr: a linear warm-up over
    --warmup-steps, then --schedule: constant, or linear or cosine decay reaching 0 at the budget."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return 1.0
    span = max(total_steps - cfg.warmup_steps, 1)
    done = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return 1.0 - done if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))


def parse_assignments(words: list[str], where: str, reserved: tuple[str, ...] = ()) -> dict:
    """Train settings written as SETTING=VALUE words (e.g. a study's variant "lr=0.02 dropout=0"), each coerced
    to its field's type; a word that is not one, or names a `reserved` setting, is refused naming `where`."""
    hints = typing.get_type_hints(TrainConfig)
    settings = {}
    for word in words:
        key, sep, value = word.partition("=")
        key = key.replace("-", "_")
        if not sep or key not in hints or key in reserved:
            raise UserError(f"{where}: '{word}' is not SETTING=VALUE of a train setting that a variant may change")
        if hints[key] is bool:  # written on a command line: true/false
            value = {"true": True, "false": False}.get(value.lower(), value)
        settings[key] = coerce_setting(value, hints[key], where)
    return settings


def _describe(value) -> str:
    return repr(value) if isinstance(value, str) else f"{value!r} ({type(value).__name__})"


def coerce_setting(value, annotation, where: str):
    """`value` as the type `annotation` of a TrainConfig field (int, float, bool, str, list[int], list[str],
    optionally `| None`), or UserError naming `where`. Kind where it is unambiguous: an integral float for an
    int, a number written as text ("1e-3", which YAML 1.1 reads as a string) for a float or an int, a bare
    value or a comma-separated string for a list."""
    args = typing.get_args(annotation)
    if type(None) in args:  # X | None
        if value is None:
            return None
        annotation = next(a for a in args if a is not type(None))
    origin = typing.get_origin(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        kind = "integers" if item is int else "strings"
        try:
            return [coerce_setting(v, item, where) for v in value]
        except UserError:
            raise UserError(f"{where} must be a list of {kind} (or a comma-separated string), got "
                            f"{_describe(value)}") from None
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where} must be true or false, got {_describe(value)}")
    if annotation is int:
        if isinstance(value, str):
            for parse in (int, float):
                try:
                    value = parse(value.strip())
                    break
                except ValueError:
                    pass
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{where} must be an integer, got {_describe(value)}")
    if annotation is float:
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise UserError(f"{where} must be a finite number, got {value}")
            return float(value)
        raise UserError(f"{where} must be a number, got {_describe(value)}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{where} must be a string, got {_describe(value)} (quote it in YAML)")
    raise AssertionError(f"unhandled setting type {annotation}")


def _resolved(key: str, value, settings: dict):
    """A setting's value as the run uses it, so that spellings of the same choice compare equal: device auto
    -> cuda:0 or cpu, cuda -> cuda:0; dtype auto -> bfloat16 on CUDA, float32 elsewhere; alpha unset -> rank;
    the corpus path -> absolute."""
    if key in ("device", "dtype"):
        device = settings.get("device") or "auto"
        if device == "auto":
            device = "cuda" if cuda_available() else "cpu"
        if device == "cuda":
            device = "cuda:0"
        if key == "device":
            return device
        if value in (None, "auto"):
            return "bfloat16" if device.startswith("cuda") else "float32"
        return value
    if key == "alpha":
        return float(value if value is not None else settings.get("rank"))
    if key in ("corpus", "preserve_text") and value:
        return os.path.abspath(str(value))
    return value


def complete_settings(recorded: dict) -> dict:
    """Every train setting, from settings a run (or a law) recorded: a setting it lacks, added to memcli since,
    is the value that does what that run did (BEFORE), else train's default."""
    defaults = dataclasses.asdict(TrainConfig())
    return {k: recorded[k] if k in recorded else BEFORE.get(k, v) for k, v in defaults.items()} | {
        k: v for k, v in recorded.items() if k not in defaults}


def setting_differences(saved: dict, cfg: TrainConfig, ignore=()) -> list[tuple[str, object, object]]:
    """(setting, saved value, new value) for every setting in which `cfg` trains differently from the settings a
    run folder's config.yaml recorded. Compares resolved values (see _resolved); settings in OUTPUT_ONLY and
    `ignore` are left out, and a setting the saved file lacks counts as what that run did (complete_settings)."""
    new = dataclasses.asdict(cfg)
    saved = complete_settings(saved)
    differs = []
    for key, value in new.items():
        if key in OUTPUT_ONLY or key in ignore:
            continue
        old = saved.get(key)
        # Equal as written: any resolved difference (dtype auto, alpha unset) follows from another setting that
        # is reported itself (device, rank).
        if old != value and _resolved(key, old, saved) != _resolved(key, value, new):
            differs.append((key, old, value))
    return differs


def describe_differences(differs: list[tuple[str, object, object]]) -> str:
    return ", ".join(f"--{k.replace('_', '-')} {old!r} -> {new!r}" for k, old, new in differs)
