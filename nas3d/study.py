"""Studies: creating, checking and loading them, their worker numbers, trial lookup and constraints.

A study is multi-objective: ``val_auc`` (maximise) and ``flops`` (minimise). Its resolved
configuration lives in the study's user attrs, so a worker needs only the study's name and storage.
What each trial runs is :mod:`nas3d.objective`; copying a trial's checkpoint out is :mod:`nas3d.export`.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from nas3d import records
from nas3d.config import StudyConfig
from nas3d.data import check_manifest_unchanged, prepare_data
from nas3d.samplers import make_sampler
from nas3d.seeds import seed_architectures
from nas3d.space import params_for
from nas3d.storages import (
    StorageSpec,
    make_storage,
    prepare_artifact_location,
    resolve_artifact_location,
)
from nas3d.util import did_you_mean

logger = logging.getLogger(__name__)

METRIC_NAMES = ("val_auc", "flops")
DIRECTIONS = ("maximize", "minimize")


class StudyNotFound(LookupError):
    """No study of that name in the storage."""


def create_study(
    config: StudyConfig, storage: optuna.storages.BaseStorage, *, artifacts: str | None = None
) -> optuna.Study:
    """Create the study ``config`` describes, or return it if it exists with the same configuration.

    ``artifacts`` (``--artifacts``): the study's artifact store, a folder or ``s3://bucket/prefix``
    (default: ``$NAS3D_ARTIFACTS``, else beside a SQLite file, else ``<home>/artifacts``). It is
    recorded in the study, checked reachable, and used by every worker and command of the study.
    Raises ``ValueError`` when a study of that name exists with a different configuration or artifact
    store (workers of one study must all train the same way and write to one place), for a relative
    folder given to a PostgreSQL study, and when the store cannot be reached.
    """
    check_cap_fits_space(config)
    location = resolve_artifact_location(artifacts, getattr(storage, "url", None))
    if artifacts is not None or _existing_location(storage, config.study.name) is None:
        prepare_artifact_location(location)  # before the study exists: a bad store creates nothing
    study = optuna.create_study(
        study_name=config.study.name,
        storage=storage,
        directions=list(DIRECTIONS),
        sampler=make_sampler(config.study, space=config.space, ode=config.ode),
        load_if_exists=True,
    )
    wanted = config.to_dict()
    existing = study.user_attrs.get(records.CONFIG)
    if existing is not None:
        # Read back through the current dataclasses, so a setting added since the study was created
        # compares as its default instead of as a difference.
        existing = StudyConfig.from_dict(existing, source=f"study {config.study.name!r}").to_dict()
        # The profile only chose defaults: a study made before it was recorded, or by a file that spells
        # out the profile's values, is the same study when every value is the same.
        existing["study"]["profile"] = wanted["study"]["profile"]
        if existing != wanted and _only_budget_differs(existing, wanted):
            _raise_budget(study, existing["study"]["n_trials"], wanted)
            existing = wanted
        if existing != wanted and _first_difference(existing, wanted).startswith("data.manifest_hash:"):
            raise ValueError(
                f"study {config.study.name!r} was created from other contents of manifest "
                f"{config.data.dataset} (its files' hash changed); restore them, or give a study of the new "
                "data another name (study.name / --name)"
            )
        if existing != wanted:
            raise ValueError(
                f"study {config.study.name!r} already exists with a different configuration "
                f"({_first_difference(existing, wanted)}); give the new one another name "
                "(study.name / --name) or drop the change"
            )
        recorded = study.user_attrs.get(records.ARTIFACTS)
        if recorded is None:  # created before stores were recorded: record the one it used
            study.set_user_attr(records.ARTIFACTS, location)
        elif artifacts is not None and recorded != location:
            raise ValueError(
                f"study {config.study.name!r} already exists with its artifacts in {recorded}, not "
                f"{location}; drop --artifacts, or give the new study another name (--name)"
            )
        return study
    study.set_user_attr(records.ARTIFACTS, location)
    study.set_user_attr(records.CONFIG, wanted)
    with warnings.catch_warnings():  # experimental since Optuna 3.2, and what the dashboard reads
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(METRIC_NAMES))
    if config.study.warm_start == "seed":
        enqueue_seed_architectures(study, config)
    return study


def prepare_study(
    config: StudyConfig, storage: str | StorageSpec | None, *, artifacts: str | None = None
) -> optuna.Study:
    """Check what the study needs (its data, its storage), then create it (recording ``artifacts``,
    see :func:`create_study`), or check the existing one.

    The data is checked first (present, and readable as the configured dataset), so a missing or
    corrupt file never leaves an empty study behind, and nas3d never falls back to other data. A
    manifest's samples are all prepared (and cached), and the study records the manifest's absolute
    path, class names, channels and content hash (:func:`nas3d.data.prepare_data`).
    """
    if config.data.in_channels > 0:  # known before the data is read (a manifest's once prepared)
        check_cap_fits_space(config)  # before a download or a manifest's preparation
    config = dataclasses.replace(config, data=prepare_data(config.data))
    return create_study(config, make_storage(storage), artifacts=artifacts)


def prepare_study_from_flags(
    flags: Mapping[str, Any], storage: str | StorageSpec | None
) -> StudyConfig:
    """``nas3d create-study`` and ``nas3d search``: the study file (``study``, on ``dataset`` if given too)
    or ``dataset``'s defaults, with the command's profile, flags and ``set`` items
    (:func:`nas3d.config.resolve_study_config`, whose lines are logged), prepared and created by
    :func:`prepare_study` (recording ``artifacts``); returns the study's configuration."""
    from nas3d.config import resolve_study_config

    said: list[str] = []  # the profile it took, what a study file lost to --dataset
    config = resolve_study_config(flags.get("study"), flags.get("dataset"), flags, flags.get("set") or (),
                                  say=said.append)
    prepare_study(config, storage, artifacts=flags.get("artifacts"))
    for line in said:  # once every check has passed: bad input stays one line on stderr
        logger.info("%s", line)
    return config


def _only_budget_differs(old: dict[str, Any], new: dict[str, Any]) -> bool:
    def without_budget(config: dict[str, Any]) -> dict[str, Any]:
        return {**config, "study": {k: v for k, v in config["study"].items() if k != "n_trials"}}

    return without_budget(old) == without_budget(new)


def _raise_budget(study: optuna.Study, stored: int, wanted: dict[str, Any]) -> None:
    """Give an existing study the larger budget ``wanted`` asks for (a used-up study goes on: its
    workers, started again, claim the new trials); a smaller one is refused."""
    asked = wanted["study"]["n_trials"]
    if asked < stored:
        raise ValueError(
            f"study {study.study_name!r} has a budget of {stored} trials; a budget can be raised, not "
            f"lowered: give --n-trials {stored} or more (or set study.n_trials so)"
        )
    study.set_user_attr(records.CONFIG, wanted)
    logger.info("study %r: budget raised from %d to %d trials", study.study_name, stored, asked)


def smallest_flops(config: StudyConfig) -> tuple[int, str]:
    """The FLOPs of the study space's smallest architecture at the study's input size, channels and
    classes, and that architecture in short form (counted on the meta device)."""
    from nas3d.costs import measure_costs
    from nas3d.pareto import smallest_seed_architecture

    arch = smallest_seed_architecture(config.space)
    data = config.data
    return measure_costs(arch, data.in_channels, data.num_classes, data.size, with_thop=False).flops, \
        arch.short_str()


def check_cap_fits_space(config: StudyConfig) -> None:
    """Refuse (one line) a ``max_flops`` cap below the smallest architecture of the space at the
    study's size: every proposal would be over it, and nothing would train."""
    cap = config.constraints.max_flops
    if cap is None:
        return
    flops, arch = smallest_flops(config)
    if flops > cap:
        size = config.data.size
        raise ValueError(
            f"constraints.max_flops {cap:.3g} is below the smallest architecture of the space at {size}³ "
            f"({flops / 1e9:.3g} GFLOPs, {flops:.3g} FLOPs: {arch}), so no architecture could train; raise "
            f"max_flops to at least {flops:.3g} (--set constraints.max_flops={flops:.3g}), or use a "
            "smaller --size" + ("" if config.study.profile == "full"
                                else f" (the {config.study.profile} profile's cap; --profile full has none)")
        )


class NothingTrained(ValueError):
    """A search ended without one trained architecture; the message says why, in one line."""


def require_trained(storage: str | StorageSpec | None, study_name: str) -> int:
    """0 when study ``study_name`` has a trained architecture (complete, or stopped early at a rung);
    else :class:`NothingTrained` naming what became of its trials and the first reason given."""
    study = optuna.load_study(study_name=study_name, storage=make_storage(storage, must_exist=True))
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.COMPLETE or t.user_attrs.get(records.EARLY_STOPPED) for t in trials):
        return 0
    if not trials:
        raise NothingTrained(f"study {study_name!r} ended with no trials at all; see the workers' log")
    kinds: dict[str, int] = {}
    for trial in trials:
        kind = trial.user_attrs.get(records.NOT_TRAINED) or trial.state.name.lower()
        kinds[kind] = kinds.get(kind, 0) + 1
    common = max(kinds, key=kinds.__getitem__)
    example = next((records.failure_reason(t) for t in trials if records.failure_reason(t)
                    and (t.user_attrs.get(records.NOT_TRAINED) or t.state.name.lower()) == common), None)
    by_count = sorted(kinds.items(), key=lambda item: -item[1])
    counts = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in by_count)
    raise NothingTrained(
        f"study {study_name!r} trained nothing: of its {len(trials)} trials, {counts}"
        + (f" (e.g. {example})" if example else "") + "; fix that, then run it again"
    )


def _existing_location(storage: optuna.storages.BaseStorage, name: str) -> str | None:
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return None
    return storage.get_study_user_attrs(study_id).get(records.ARTIFACTS)


def _first_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    for table in sorted(set(old) | set(new)):
        for key in sorted(set(old.get(table, {})) | set(new.get(table, {}))):
            before, after = old.get(table, {}).get(key), new.get(table, {}).get(key)
            if before != after:
                return f"{table}.{key}: stored {before!r}, asked {after!r}"
    return "unknown difference"


def enqueue_seed_architectures(study: optuna.Study, config: StudyConfig) -> int:
    """Queue the seed study's published architectures (those inside the space) as the first trials."""
    queued = 0
    for dataset, arch in seed_architectures().items():
        try:
            params = params_for(arch, config.space)
        except ValueError as e:
            logger.warning("warm start: skipping the %s seed architecture: %s", dataset, e)
            continue
        study.enqueue_trial(params, user_attrs={records.WARM_START: f"seed:{dataset}"}, skip_if_exists=True)
        queued += 1
    return queued


def load_study(
    name: str, storage: optuna.storages.BaseStorage, *, worker_number: int | None = None,
    check_data: bool = False,
) -> tuple[optuna.Study, StudyConfig]:
    """Load study ``name`` with its stored configuration.

    ``check_data``: refuse (:class:`nas3d.data.ManifestChanged`, one line) a study made from a manifest
    whose files here hash otherwise than when it was created: every worker must train on the same data.

    ``worker_number`` (a number no other worker of the study has, from
    :func:`allocate_worker_number`) seeds this worker's own sampler: workers with one seed would
    propose the same architectures in lockstep, and a restarted worker would replay its first life.
    """
    study_id = study_id_of(storage, name, fix="create it first with `nas3d create-study --study FILE` "
                                              "(or run `nas3d search`)")
    # Read only this study's attrs: summaries of every study would load every trial in the database.
    user_attrs = storage.get_study_user_attrs(study_id)
    if records.CONFIG not in user_attrs:
        raise ValueError(f"study {name!r} was not created by nas3d (no {records.CONFIG!r} user attr)")
    config = StudyConfig.from_dict(user_attrs[records.CONFIG], source=f"study {name!r}")
    if check_data:
        check_manifest_unchanged(config.data)
    sampler = make_sampler(config.study, space=config.space, ode=config.ode, worker_number=worker_number)
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    return study, config


def study_id_of(storage: optuna.storages.BaseStorage, name: str, *, fix: str | None = None) -> int:
    """The id of study ``name``; else :class:`StudyNotFound`, one line naming the closest name, the
    studies there are and ``fix``."""
    try:
        return storage.get_study_id_from_name(name)
    except KeyError:
        pass
    names = [s.study_name for s in storage.get_all_studies()]
    close = did_you_mean(name, names)
    there = (f"did you mean {close!r}? " if close else "") + (
        f"it holds {', '.join(map(repr, names[:10]))}{' ...' if len(names) > 10 else ''}" if names
        else "it holds no studies")
    fix = fix or ("`nas3d status` lists them (is --storage / $NAS3D_STORAGE the one the workers used?)")
    raise StudyNotFound(f"no study named {name!r} in this storage ({there}); {fix}")


def only_study_name(storage: optuna.storages.BaseStorage) -> str:
    """The name of the one study in ``storage`` (a command's ``--study-name`` left out); else one line
    saying there is none, or naming them all."""
    names = [s.study_name for s in storage.get_all_studies()]
    if len(names) == 1:
        return names[0]
    if not names:
        raise StudyNotFound("this storage holds no studies; create one with `nas3d search` (is --storage / "
                            "$NAS3D_STORAGE the one the workers used?)")
    raise LookupError(f"this storage holds {len(names)} studies ({', '.join(map(repr, names))}); say which "
                      "with --study-name")


def allocate_worker_number(study: optuna.Study) -> int:
    """The next worker number of ``study`` (0, 1, 2, ... over the study's life, never reused).

    Call it holding the study lock: the read and the write must not interleave with another worker's.
    """
    storage, study_id = study._storage, study._study_id
    number = int(storage.get_study_system_attrs(study_id).get(records.WORKERS, 0))
    storage.set_study_system_attr(study_id, records.WORKERS, number + 1)
    return number


def record_constraints(trial: optuna.trial.Trial, values: Mapping[str, float]) -> None:
    """Record constraint values (feasible iff all <= 0) where both samplers and the dashboard see them.

    Optuna 5 samplers read ``trial.constraints``, which merges the legacy list under system attr
    ``"constraints"`` with the per-name ``"constraints:<name>"`` keys of ``Trial.set_constraint``;
    optuna-dashboard 0.21 shows only the legacy list. So we write the list alone (in ``values``
    order; writing both formats would count every constraint twice). Call once per trial, before
    the objective returns.
    """
    vals = [float(v) for v in values.values()]
    if any(v != v for v in vals):
        raise ValueError(f"constraint values must not be NaN, got {dict(values)}")
    # No public setter for system attrs exists in Optuna 5; this is what Optuna itself does
    # for samplers' constraints_func (optuna.samplers._base._process_constraints_after_trial).
    trial.storage.set_trial_system_attr(trial._trial_id, records.CONSTRAINTS, vals)


def load_trial(storage: optuna.storages.BaseStorage, study_name: str, number: int) -> FrozenTrial:
    """Trial ``number`` of study ``study_name``; one-line ``LookupError`` naming what exists."""
    study_id = study_id_of(storage, study_name)
    try:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    except KeyError:
        count = len(storage.get_all_trials(study_id, deepcopy=False))
        numbers = f"numbered 0 to {count - 1}" if count else "none yet"
        raise LookupError(f"study {study_name!r} has no trial {number} (its trials: {numbers})") from None
    return storage.get_trial(trial_id)
