"""Study configuration: a typed, frozen view of a ``studies/*.toml`` file and its overrides.

A study file has the tables ``[study]``, ``[data]`` (``nas3d.data.DataConfig``), ``[train]``
(``nas3d.train.TrainConfig``), ``[space]`` (``nas3d.space.SearchSpace``), ``[constraints]`` and
``[ode]`` (``nas3d.samplers.ODESettings``, read when ``sampler = "ode"``), ``[early_stopping]``
(``nas3d.early_stopping.EarlyStoppingConfig``) and ``[racing]`` (``nas3d.racing.RacingConfig``).
Every table is optional except ``[study]`` (``name`` is required); omitted keys take the study's profile's
values (:data:`PROFILES`), else the seed study's. Unknown keys and wrong types are errors naming where.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nas3d.data import DataConfig, is_manifest
from nas3d.early_stopping import EarlyStoppingConfig
from nas3d.racing import RacingConfig
from nas3d.samplers import SAMPLERS, ODESettings
from nas3d.space import SearchSpace
from nas3d.train import TrainConfig
from nas3d.util import check_choice, did_you_mean

__all__ = [
    "PROFILES",
    "WARM_STARTS",
    "ConfigError",
    "Constraints",
    "EarlyStoppingConfig",
    "RacingConfig",
    "StudyConfig",
    "StudySettings",
    "default_study_config",
    "load_study_config",
    "parse_overrides",
    "resolve_study_config",
]

WARM_STARTS = ("none", "seed")

#: Search profiles: the values a study takes where neither its file nor the flags give one, by
#: ``[study] profile`` (``--profile``). "full": the seed study's (the dataclasses' defaults). "cpu": a
#: search that finishes on a 2-core CPU at 28³, for any data (``--cpu`` on a manifest without a study
#: file takes it), chosen from the real-data architecture table and its replays
#: (docs/arch-table.md#what-the-defaults-became-and-why): the table's range of operations, filters and
#: FLOPs, its quarter of train at batch 32, the whole val split (it ranks at +0.40 to +0.87 where the
#: quarter does not), 8 epochs, no early stopping; 10 trials (timed at 16 min on 2 cores: docs/own-data.md).
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "full": {},
    "cpu": {
        "study": {"n_trials": 10, "sampler_seed": 0},
        "data": {"search_fraction": 0.25, "search_val_fraction": 1.0},
        "train": {"max_epochs": 8, "patience": 8, "batch_size": 32},
        "space": {"ops": ["conv3_in_relu", "conv3_in_mish", "in_mish_conv3", "relu_conv3", "mish_conv3"],
                  "stacks": [1, 2], "cells_per_stack": [1, 2], "initial_filters": [8, 16]},
        "constraints": {"max_flops": 5e8},
        "early_stopping": {"kind": "none"},
    },
}


class ConfigError(ValueError):
    """A study configuration problem; the message is one line naming where and what."""


@dataclass(frozen=True)
class StudySettings:
    """The ``[study]`` table: identity, budget, sampler and what each trial records besides its scores."""

    name: str
    # budget: architectures trained (complete + stopped early) across all workers; duplicates of an
    # evaluated architecture and failed trials are free, up to 100 in a row (see nas3d.budget).
    # A study's budget can be raised later (create-study / search --n-trials N), never lowered.
    n_trials: int = 200
    sampler: str = "tpe"
    sampler_seed: int | None = None
    warm_start: str = "none"  # "seed": enqueue the seed study's published architectures first
    # Zero-cost proxy scores of each untrained model (user attr "proxies"): 31-36 s a trial at 64³ on
    # a CPU, read only by the benches (bench/arch_table.py), so off unless a study asks.
    proxies: bool = False
    profile: str = "full"  # PROFILES: the defaults the other keys take (recorded: what the study began from)

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ValueError("name must not be empty")
        if self.n_trials < 1:
            raise ValueError(f"n_trials must be >= 1, got {self.n_trials}")
        check_choice("sampler", self.sampler, SAMPLERS)
        check_choice("warm_start", self.warm_start, WARM_STARTS)
        check_choice("profile", self.profile, tuple(PROFILES))


@dataclass(frozen=True)
class Constraints:
    """The ``[constraints]`` table: hard caps on cost; None means no cap."""

    max_flops: float | None = None
    max_params: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_flops", "max_params"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")

    @property
    def active(self) -> bool:
        return self.max_flops is not None or self.max_params is not None

    def evaluate(self, *, flops: float, params: float) -> dict[str, float]:
        """Constraint values for Optuna (feasible iff all <= 0), one per set cap.

        Relative excess ``value / cap - 1`` so that a FLOPs and a params violation weigh alike;
        Optuna ranks infeasible trials by the sum of positive values.
        """
        values = {}
        if self.max_flops is not None:
            values["flops"] = flops / self.max_flops - 1.0
        if self.max_params is not None:
            values["params"] = params / self.max_params - 1.0
        return values


@dataclass(frozen=True)
class StudyConfig:
    """A whole study: what ``nas3d`` workers need, stored in the study's user attrs as JSON."""

    study: StudySettings
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    space: SearchSpace = field(default_factory=SearchSpace)
    constraints: Constraints = field(default_factory=Constraints)
    # A study stored before [ode] existed reads back with these defaults, so it still compares equal.
    ode: ODESettings = field(default_factory=ODESettings)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    racing: RacingConfig = field(default_factory=RacingConfig)

    def __post_init__(self) -> None:
        if self.racing.active and self.data.trained_folds < 2:
            raise ValueError(f'racing.kind = "{self.racing.kind}" races a trial across its folds, but it '
                             f"trains {self.data.trained_folds}: set data.cv_folds >= 2 (and "
                             'data.cv_train_folds 0 or >= 2) or racing.kind = "none"')
        stopper = self.early_stopping
        if stopper.active and not stopper.rungs(self.train.max_epochs):
            raise ValueError(
                f"early_stopping.min_epochs ({stopper.min_epochs}) must be below train.max_epochs "
                f"({self.train.max_epochs}) for the {stopper.kind} stopper to act; lower min_epochs "
                'or set early_stopping.kind = "none"'
            )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """JSON-compatible dict (tuples become lists); ``from_dict`` reverses it."""
        return {f.name: _to_json(dataclasses.asdict(getattr(self, f.name))) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> StudyConfig:
        """Build from ``to_dict()`` output or a parsed TOML document, with full validation; keys it
        leaves out take its profile's values (``[study] profile``, :data:`PROFILES`), then the defaults."""
        return _build(cls, _with_profile(data), source, table=None)

    def with_overrides(self, dotted: Mapping[str, object], source: str = "override") -> StudyConfig:
        """A copy with ``{"table.key": value}`` replaced, e.g. from CLI flags.

        A string value for a non-string field is read as a TOML value (``"3"``, ``"1e-3"``,
        ``"true"``, ``"[8, 16]"``), so ``--set train.max_epochs=3`` works without per-key parsing.
        """
        data = self.to_dict()
        if "study.profile" in dotted:  # every key is explicit here: a profile would change nothing
            raise ConfigError(f"{source}: study.profile chooses the defaults a study starts from; give "
                              f"--profile {dotted['study.profile']} instead of --set study.profile")
        for dotted_key, value in dotted.items():
            table, sep, key = dotted_key.partition(".")
            if not sep or table not in data:
                _unknown(source, None, table if sep else dotted_key, list(data), what="table")
            if key not in data[table]:
                _unknown(source, table, key, list(data[table]))
            hint = _field_types(type(getattr(self, table)))[key]
            if isinstance(value, str) and str not in _accepted(hint):
                value = _parse_toml_value(value)
            data[table][key] = value
        return _build(type(self), data, source, table=None)


def default_study_config(dataset: str, size: int = 28, profile: str = "full") -> StudyConfig:
    """The setup of ``profile`` (:data:`PROFILES`) for one dataset, named ``{name}-{size}[-cpu]``."""
    check_choice("--profile", profile, tuple(PROFILES))
    suffix = "" if profile == "full" else f"-{profile}"
    name = f"{DataConfig(dataset=dataset, size=size).name}-{size}{suffix}"
    return StudyConfig.from_dict({"study": {"name": name, "profile": profile},
                                  "data": {"dataset": dataset, "size": size}}, source="command line")


def _with_profile(doc: Any) -> Any:
    """A study document with its profile's values (:data:`PROFILES`) under the keys it leaves out."""
    study = doc.get("study") if isinstance(doc, Mapping) else None
    profile = PROFILES.get(study.get("profile", "full"), {}) if isinstance(study, Mapping) else {}
    merged = dict(doc) if profile else doc
    for table, values in profile.items():  # a table that is not a table is left for _build to name
        given = merged.get(table, {})
        merged[table] = {**values, **given} if isinstance(given, Mapping) else given
    return merged


def load_study_config(path: str | Path, profile: str | None = None) -> StudyConfig:
    """Read and validate a study TOML file (``profile``: as ``--profile``); one-line ``ConfigError``s."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: study file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read study file: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {e.object[e.start]:#04x} at offset "
                          f"{e.start}); a study file is TOML, e.g. a copy of studies/smoke.toml") from None
    if "\x00" in text:  # valid UTF-8 but binary: tomllib would name only a character, not the file's kind
        raise ConfigError(f"{path}: a binary file (it holds NUL bytes), not a TOML study file; "
                          "give a .toml such as studies/smoke.toml")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # tomllib's message already ends with "(at line N, column M)"
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    if profile is not None and isinstance(doc.get("study"), dict):
        check_choice("--profile", profile, tuple(PROFILES))
        doc["study"]["profile"] = profile
    config = StudyConfig.from_dict(doc, source=str(path))
    manifest = Path(config.data.dataset).expanduser()
    if config.data.is_manifest and not manifest.is_absolute():
        # A manifest named in a study file is relative to that file, wherever the command runs.
        config = dataclasses.replace(config, data=dataclasses.replace(
            config.data, dataset=str((path.parent / manifest).absolute())))
    return config


#: Command-line flags that set one study-file key each (``--n-trials 20`` is ``study.n_trials``).
FLAG_KEYS = {
    "size": "data.size", "name": "study.name", "n_trials": "study.n_trials", "max_epochs": "train.max_epochs",
    "data_root": "data.root", "sampler": "study.sampler", "warm_start": "study.warm_start",
}


def resolve_study_config(
    study_file: str | Path | None,
    dataset: str | None,
    flags: Mapping[str, object],
    sets: Iterable[str] = (),
    say: Callable[[str], object] = lambda line: None,
) -> StudyConfig:
    """The study file (on ``dataset`` if given too: :func:`_with_dataset`), else the defaults for
    ``dataset``, in the profile ``flags["profile"]`` picks (:data:`PROFILES`; left out, ``--cpu`` on a
    manifest without a study file takes "cpu"), with the flags of :data:`FLAG_KEYS` set in ``flags``
    and the ``--set`` items applied. ``say`` gets a line on each choice made for the user."""
    profile = flags.get("profile")
    auto = profile is None and not study_file and bool(flags.get("cpu")) and is_manifest(dataset or "")
    profile = "cpu" if auto else profile
    if study_file:
        config = load_study_config(study_file, profile=profile)
        if dataset:
            config = _with_dataset(config, dataset, str(study_file), flags, say)
    else:
        size = int(flags.get("size") or 28)
        config = default_study_config(dataset or "organmnist3d", size, profile or "full")
    overrides = {key: flags[flag] for flag, key in FLAG_KEYS.items() if flags.get(flag) is not None}
    overrides.update(parse_overrides(sets))
    config = config.with_overrides(overrides, source="command line") if overrides else config
    if config.study.profile != "full":
        say(profile_line(config, " (--cpu on a manifest without a study file)" if auto else ""))
    return config


def profile_line(config: StudyConfig, why: str = "") -> str:
    """What a study's profile set, as resolved (flags and ``--set`` included), and how to leave it."""
    space, train, data = config.space, config.train, config.data
    kernels = sorted({int(k) for op in space.ops for k in re.findall(r"conv(\d)", op)})
    cap = config.constraints.max_flops
    val = data.fraction("val")
    return (f"profile {config.study.profile}{why}: {len(space.ops)} operations of kernel "
            f"{'/'.join(map(str, kernels))}, {'/'.join(map(str, space.initial_filters))} initial filters"
            + (f", at most {cap:.3g} FLOPs" if cap else "")
            + f"; {config.study.n_trials} trials of up to {train.max_epochs} epochs at batch "
            f"{train.batch_size} on {data.fraction('train'):.0%} of train, scored on "
            + ("the whole val split" if val == 1.0 else f"{val:.0%} of val")
            + "; --profile full for the seed study's full space and budget")


#: Data settings of a study file that describe its own data, not a dataset given with it: reset.
_DATA_OF_ITS_OWN = ("root", "download", "synthetic_classes", "synthetic_samples", "channels", "manifest_hash",
                    "percentile_bounds", "monai_version")


def _with_dataset(config: StudyConfig, dataset: str, source: str, flags: Mapping[str, object],
                  say: Callable[[str], object]) -> StudyConfig:
    """``--study FILE --dataset labels.csv``: the file's settings on ``dataset``; those of its own data
    (:data:`_DATA_OF_ITS_OWN`) reset, a name made from its dataset's made from the new one's (unless
    ``--name``); ``say`` gets one line naming them."""
    old = config.data
    if dataset == old.dataset:
        return config
    defaults = DataConfig()
    changes: dict[str, object] = {f"data.{key}": getattr(defaults, key) for key in _DATA_OF_ITS_OWN}
    changes["data.dataset"] = dataset
    if flags.get("size"):  # the name made below carries the size the study will have
        changes["data.size"] = flags["size"]
    config = config.with_overrides(changes, source=f"{source} with --dataset {dataset}")
    said = [f"data.{key} {getattr(old, key)!r} dropped" for key in _DATA_OF_ITS_OWN
            if getattr(old, key) != getattr(defaults, key)]
    if not flags.get("name") and old.name in config.study.name:
        name = default_study_config(dataset, config.data.size, config.study.profile).study.name
        said.insert(0, f"study.name {config.study.name!r} -> {name!r} (--name for another)")
        config = dataclasses.replace(config, study=dataclasses.replace(config.study, name=name))
    say(f"{source} with {dataset} as its data" + (": " + ", ".join(said) if said else ""))
    return config


def parse_overrides(items: Iterable[str], *, only_table: str | None = None) -> dict[str, str]:
    """``--set TABLE.KEY=VALUE`` items as ``{"table.key": "value"}`` for :meth:`StudyConfig.with_overrides`.

    ``only_table`` restricts the keys to one table (``retrain`` takes ``data.*`` only).
    """
    overrides: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or "." not in key or (only_table and not key.startswith(only_table + ".")):
            form = f"{only_table}.KEY=VALUE" if only_table else "TABLE.KEY=VALUE"
            raise ValueError(f"--set expects {form}, but got {item!r}")
        overrides[key] = value.strip()
    return overrides


# --- generic dataclass building -------------------------------------------------------------------


def _build(cls: type, data: Any, source: str, table: str | None) -> Any:
    where = f"[{table}]" if table else "top level"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {where} must be a table, got {data!r}")
    types_ = _field_types(cls)
    for key in data:
        if key not in types_:
            _unknown(source, table, key, list(types_), what="table" if table is None else "key")
    kwargs = {}
    for name, hint in types_.items():
        if name in data:
            if table is None:  # top level: every field is a nested dataclass (a table)
                kwargs[name] = _build(hint, data[name], source, name)
            else:
                kwargs[name] = _check_value(data[name], hint, source, table, name)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs and _required(f)]
        if missing and table is None:
            raise ConfigError(f"{source}: missing required table [{missing[0]}]") from None
        if missing:
            raise ConfigError(f"{source}: {where}: missing required key {missing[0]!r}") from None
        raise ConfigError(f"{source}: {where}: {e}") from None
    except ValueError as e:  # the dataclass's own validation
        raise ConfigError(f"{source}: {where}: {e}") from None


def _required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _accepted(hint: Any) -> tuple[Any, ...]:
    """The members of a union (``int | None`` → (int, NoneType)), else the hint itself."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def _type_name(hint: Any) -> str:
    names = []
    for h in _accepted(hint):
        if typing.get_origin(h) is tuple:
            names.append(f"list of {typing.get_args(h)[0].__name__}")
        else:
            names.append("none" if h is type(None) else h.__name__)
    return " or ".join(names)


def _check_value(value: Any, hint: Any, source: str, table: str, key: str) -> Any:
    for h in _accepted(hint):
        ok, converted = _convert(value, h)
        if ok:
            if not all(math.isfinite(v) for v in _floats(converted)):
                # TOML reads nan and inf as floats; no setting means either, and a nan cap or rate
                # would only surface as a failed trial later.
                raise ConfigError(f"{source}: [{table}] {key}: must be a finite number, got {value!r}")
            return converted
    raise ConfigError(f"{source}: [{table}] {key}: expected {_type_name(hint)}, got {value!r}")


def _convert(value: Any, hint: Any) -> tuple[bool, Any]:
    if hint is type(None):
        return value is None, None
    if typing.get_origin(hint) is tuple:
        (elem, *_rest) = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            return False, None
        items = [_convert(v, elem) for v in value]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    # bool is an int in Python, but `max_epochs = true` is a mistake, not 1
    if hint is bool or isinstance(value, bool):
        return (hint is bool and isinstance(value, bool)), value
    if hint is float and isinstance(value, int | float):
        return True, float(value)
    return isinstance(value, hint), value


def _floats(value: Any) -> list[float]:
    items = value if isinstance(value, tuple) else (value,)
    return [v for v in items if isinstance(v, float)]


def _unknown(
    source: str, table: str | None, key: str, valid: list[str], what: str = "key"
) -> typing.NoReturn:
    where = f" in [{table}]" if table else ""
    close = did_you_mean(key, valid)
    hint = f"; did you mean {close!r}?" if close else ""
    raise ConfigError(f"{source}: unknown {what} {key!r}{where}{hint} (valid: {', '.join(valid)})")


def _parse_toml_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # left for the type check to reject with the usual message


def _to_json(value: Any) -> Any:
    # round-trip through json to turn tuples into lists and fail here on anything non-JSON
    return json.loads(json.dumps(value))
