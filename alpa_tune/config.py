"""Study configuration: TOML file + ``--set`` overrides -> validated, typed objects.

Every field is checked before any work starts; a bad field raises :class:`ConfigError`
whose message is one line naming the key and what is wrong (the CLI prints it, exit 2).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import tomli_w

from alpa_tune.errors import BadInput
from alpa_tune.files import read_text
from alpa_tune.units import format_bytes

# Every fixed choice is a Literal: the loader refuses anything else with one line naming the key,
# and each dispatch on it raises on a name it does not know.
Variant = Literal["alpa", "alpa_hill"]
Sampler = Literal["tpe", "random", "qmc", "cmaes"]
Pruner = Literal["none", "median", "wilcoxon", "successive_halving"]
ReportMode = Literal["fold", "epoch"]
Scheduler = Literal["none", "cosine"]
Optimizer = Literal["adam", "adamw"]
AmpMode = Literal["auto", "off", "bf16", "fp16"]
Focusing = Literal["reference", "single"]
VARIANTS: tuple[str, ...] = get_args(Variant)
SAMPLERS: tuple[str, ...] = get_args(Sampler)
PRUNERS: tuple[str, ...] = get_args(Pruner)
REPORT_MODES: tuple[str, ...] = get_args(ReportMode)
SCHEDULERS: tuple[str, ...] = get_args(Scheduler)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
AMP_MODES: tuple[str, ...] = get_args(AmpMode)
# The search space's hard limits: the paper's ranges, which every loss is proven finite on.
SPACE_LIMITS = {
    "alpha": (0.5, 2.0),
    "beta": (0.5, 2.0),
    "gamma_pos": (0.0, 5.0),
    "gamma_neg": (0.0, 5.0),
}


class ConfigError(BadInput):
    """A config value is missing, misspelt, of the wrong type or impossible."""


@dataclass(frozen=True)
class DataConfig:
    source: str = "digits-lt"
    path: str | None = None  # dataset file or folder (npz, csv, class-folder root)
    images: str | None = None  # image folder for the csv source
    image_size: int = 32
    cache_dir: str | None = None  # default: the user cache folder
    imbalance_ratio: float = 20.0  # digits-lt / synthetic: n_max / n_min
    id_column: str = "id_code"
    label_column: str = "diagnosis"
    extension: str | None = None  # csv source: image extension, found when unset
    official_splits: bool = False  # medmnist: keep train+val for tuning, test as hold-out
    num_classes: int = 5  # synthetic only
    samples_per_class: int = 60  # synthetic / digits-lt head class size cap
    num_samples: int | None = None  # synthetic: total (overrides samples_per_class)


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet10t"
    pretrained: bool = False
    checkpoint: str | None = None
    drop_rate: float = 0.0


@dataclass(frozen=True)
class TrainingConfig:
    folds: int = 3
    epochs: int = 4
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    holdout: float = 0.2
    seed: int = 0
    optimizer: Optimizer = "adamw"
    scheduler: Scheduler = "none"
    warmup_epochs: int = 0
    grad_clip: float = 0.0  # 0 disables clipping
    amp: AmpMode = "auto"  # auto: bf16 on CUDA, off on CPU
    channels_last: bool = True
    compile: bool = False
    augment: bool = True
    device: str = "auto"  # auto | cpu | cuda | cuda:K
    threads: int = 0  # torch threads per worker; 0 = cores / local workers


@dataclass(frozen=True)
class SpaceConfig:
    alpha: tuple[float, float] = (0.5, 2.0)
    beta: tuple[float, float] = (0.5, 2.0)
    gamma_pos: tuple[float, float] = (0.0, 5.0)
    gamma_neg: tuple[float, float] = (0.0, 5.0)
    clip: float = 0.05
    focusing: Focusing = "reference"
    hill_lambda: float = 1.5


@dataclass(frozen=True)
class SearchConfig:
    loss: str = "alpa"  # a registered loss; its declared space is searched (checked by preflight)
    n_trials: int = 8
    sampler: Sampler = "tpe"
    pruner: Pruner = "median"
    seed: int = 0
    variants: tuple[Variant, ...] = VARIANTS
    report: ReportMode = "fold"
    n_startup_trials: int = 4
    enqueue_paper_points: bool = True
    # ALPA: the typed ranges below. Another loss: a table of its declared parameters, each
    # [low, high] (narrows), a list (narrows a choice) or a value (fixes it).
    space: SpaceConfig | dict[str, Any] = field(default_factory=SpaceConfig)

    @property
    def tunes_alpa(self) -> bool:
        return self.loss == "alpa"


@dataclass(frozen=True)
class WorkersConfig:
    heartbeat_interval: int = 10
    grace_period: int = 30
    max_retries: int = 2
    storage_patience: int = 600  # seconds a worker waits out a storage outage before it exits


@dataclass(frozen=True)
class StudyConfig:
    name: str
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/TOML-ready dict (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    def replace(self, overrides: list[str]) -> StudyConfig:
        """A copy with ``--set KEY=VALUE`` overrides applied and validated."""
        raw = self.to_dict()
        apply_overrides(raw, overrides)
        return config_from_dict(raw)


# Keys a single worker may change without training differently from the others.
MACHINE_LOCAL_KEYS = frozenset(
    {"data.path", "data.images", "data.cache_dir", "model.checkpoint", "training.device", "training.threads"}
)


def load_config(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    """Read a study TOML file, apply ``--set`` overrides, validate everything."""
    path = Path(path)
    text = read_text(path, "config file", ConfigError)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    raw.setdefault("name", path.stem)
    apply_overrides(raw, overrides or [])
    return config_from_dict(raw)


def parse_override(item: str) -> tuple[str, Any]:
    """``"training.folds=3"`` -> ``("training.folds", 3)``; the value is parsed as TOML."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. training.folds=3")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        # A bare word (a path, a backbone name) is meant as a string.
        parsed = value.strip()
    return key, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> None:
    """Apply ``--set`` overrides to a raw config dict in place."""
    for item in overrides:
        key, value = parse_override(item)
        parts = key.split(".")
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value


def override_keys(overrides: list[str]) -> list[str]:
    return [parse_override(item)[0] for item in overrides]


def config_from_dict(raw: dict[str, Any]) -> StudyConfig:
    """Build and validate a StudyConfig from a raw (TOML-shaped) dict."""
    config = _build(StudyConfig, raw, prefix="")
    _validate(config)
    return config


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table, got {_describe(raw)}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            valid = ", ".join(sorted(names))
            raise ConfigError(f"{prefix}{key}: unknown key (valid keys here: {valid})")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        hint = hints[f.name]
        key = f"{prefix}{f.name}"
        if cls is SearchConfig and f.name == "space" and raw.get("loss", "alpa") != "alpa":
            # Another loss's space: its keys are that loss's parameters, checked by preflight.
            if not isinstance(raw["space"], dict):
                raise ConfigError(f"{key}: expected a table, got {_describe(raw['space'])}")
            values["space"] = dict(raw["space"])
            continue
        if (get_origin(hint) is Union or isinstance(hint, types.UnionType)) and \
                any(dataclasses.is_dataclass(a) for a in get_args(hint)):  # ALPA's typed space
            hint = next(a for a in get_args(hint) if dataclasses.is_dataclass(a))
        if dataclasses.is_dataclass(hint):
            values[f.name] = _build(hint, raw[f.name], prefix=f"{key}.")
        else:
            values[f.name] = _coerce(raw[f.name], hint, key)
    if cls is SearchConfig and raw.get("loss", "alpa") != "alpa" and "space" not in values:
        values["space"] = {}  # another loss without overrides: its whole declared space
    try:
        return cls(**values)
    except TypeError as exc:  # a required key (only `name`) is missing
        raise ConfigError(f"{prefix or ''}{exc}") from None


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        if value in args and isinstance(value, str):
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(args)}")
    if origin is not None and type(None) in args:  # X | None
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(value, inner, key)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {_describe(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {_describe(value)}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: expected a finite number, got {value}")
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {_describe(value)}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {_describe(value)}")
    if origin is tuple and args == (float, float):
        if isinstance(value, list) and len(value) == 2:
            return tuple(_coerce(v, float, key) for v in value)
        raise ConfigError(f"{key}: expected [low, high], got {_describe(value)}")
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            return tuple(_coerce(v, args[0], key) for v in value)
        raise ConfigError(f"{key}: expected a list, got {_describe(value)}")
    raise ConfigError(f"{key}: unsupported type {hint}")  # pragma: no cover - a coding error


def _describe(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)
    return f"{kind} ({value!r})" if not isinstance(value, dict) else kind


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{key}: must be >= {low}, got {value}")


# What one machine can hold: a decoded image takes 3 x size² bytes (in the cache or in memory)
# and one batch of float32 inputs 12 x batch x size² bytes before any activation.
MAX_IMAGE_SIZE = 1024
MAX_BATCH_BYTES = 4 * 10**9


def _validate(c: StudyConfig) -> None:
    if not c.name or not all(ch.isalnum() or ch in "-_." for ch in c.name):
        raise ConfigError(f"name: {c.name!r} must be non-empty letters, digits, '-', '_' or '.'")

    d = c.data
    _at_least("data.image_size", d.image_size, 8)
    if d.image_size > MAX_IMAGE_SIZE:
        raise ConfigError(
            f"data.image_size: at most {MAX_IMAGE_SIZE} px, got {d.image_size} (a decoded image takes 3 x size² "
            f"bytes, {format_bytes(3 * d.image_size**2)} at {d.image_size} px, kept for every image; the paper uses 256)"
        )
    if d.imbalance_ratio < 1:
        raise ConfigError(f"data.imbalance_ratio: must be >= 1, got {d.imbalance_ratio}")
    _at_least("data.num_classes", d.num_classes, 2)
    _at_least("data.samples_per_class", d.samples_per_class, 1)

    if not 0 <= c.model.drop_rate < 1:
        raise ConfigError(f"model.drop_rate: must be in [0, 1), got {c.model.drop_rate}")

    t = c.training
    _at_least("training.folds", t.folds, 2)
    _at_least("training.epochs", t.epochs, 1)
    _at_least("training.batch_size", t.batch_size, 1)
    batch_bytes = 12 * t.batch_size * d.image_size**2
    if batch_bytes > MAX_BATCH_BYTES:
        raise ConfigError(
            f"training.batch_size: at most {MAX_BATCH_BYTES // (12 * d.image_size**2):,} at data.image_size "
            f"{d.image_size}, got {t.batch_size:,} (one batch of float32 inputs, batch x 3 x {d.image_size}² x 4 "
            f"bytes, would take {format_bytes(batch_bytes)}, over the {format_bytes(MAX_BATCH_BYTES)} bound, "
            f"before any activation)"
        )
    if t.lr <= 0:
        raise ConfigError(f"training.lr: must be > 0, got {t.lr}")
    _at_least("training.weight_decay", t.weight_decay, 0)
    if not 0 < t.holdout < 1:
        raise ConfigError(f"training.holdout: must be between 0 and 1, got {t.holdout}")
    _at_least("training.warmup_epochs", t.warmup_epochs, 0)
    _at_least("training.grad_clip", t.grad_clip, 0)
    _at_least("training.threads", t.threads, 0)
    if t.device not in ("auto", "cpu", "cuda") and not (
        t.device.startswith("cuda:") and t.device[5:].isdigit()
    ):
        raise ConfigError(f"training.device: {t.device!r} is not one of auto, cpu, cuda, cuda:K")

    s = c.search
    _at_least("search.n_trials", s.n_trials, 1)
    _at_least("search.n_startup_trials", s.n_startup_trials, 0)
    if not s.loss or not all(ch.isalnum() or ch == "_" for ch in s.loss):
        raise ConfigError(f"search.loss: {s.loss!r} is not a loss name (alpa, focal, asl, ...)")
    if not s.variants:
        raise ConfigError("search.variants: must name at least one of " + ", ".join(VARIANTS))
    if len(set(s.variants)) != len(s.variants):
        raise ConfigError(f"search.variants: {list(s.variants)} repeats a variant")
    if not isinstance(s.space, SpaceConfig):
        _validate_workers(c.workers)
        return  # another loss's space: its keys are checked against the loss by preflight
    for name, (lo_limit, hi_limit) in SPACE_LIMITS.items():
        low, high = getattr(s.space, name)
        key = f"search.space.{name}"
        if low > high:
            raise ConfigError(f"{key}: low {low} is greater than high {high}")
        if low < lo_limit or high > hi_limit:
            raise ConfigError(f"{key}: [{low}, {high}] leaves the allowed range [{lo_limit}, {hi_limit}]")
    if not 0 <= s.space.clip <= 0.2:
        raise ConfigError(f"search.space.clip: must be in [0, 0.2], got {s.space.clip}")
    if s.space.hill_lambda <= 1:
        raise ConfigError(f"search.space.hill_lambda: must be > 1 so (lambda - p) stays positive, got {s.space.hill_lambda}")
    _validate_workers(c.workers)


def _validate_workers(w: WorkersConfig) -> None:
    _at_least("workers.heartbeat_interval", w.heartbeat_interval, 1)
    if w.grace_period <= w.heartbeat_interval:
        raise ConfigError(
            f"workers.grace_period: must exceed workers.heartbeat_interval ({w.heartbeat_interval}), got {w.grace_period}"
        )
    _at_least("workers.max_retries", w.max_retries, 0)
    _at_least("workers.storage_patience", w.storage_patience, 1)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def to_toml(data: dict[str, Any]) -> str:
    """``data`` as a TOML document (configs and exports; ``tomllib`` reads it back).

    TOML has no null: a None value in a table is left out (an unset option reads back as its
    default), and a None inside an array (a class absent from every fold) is written as nan.
    """
    return tomli_w.dumps(_toml_ready(data))


def _toml_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _toml_ready(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [math.nan if v is None else _toml_ready(v) for v in value]
    return value
