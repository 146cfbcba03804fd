"""Sweep definitions in ``search_spaces/*.yaml`` (SPEC §8): a base config, fixed overrides, a
parameter space over any config key, the Tune settings and the MLflow experiment. Everything is
validated — every grid value and distribution bound is applied to the base config — before
anything starts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config import (ExperimentConfig, apply_overrides, config_from_dict, differing_keys, flatten,
                                 is_integer, is_number, load_yaml, resolve_config_path, resolve_named_file)
from orchestrator.errors import UserError

SPACE_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
TOP_LEVEL = ("base", "experiment", "fixed", "param_space", "tune")
TUNE_KEYS = ("metric", "mode", "scheduler", "num_samples", "max_concurrent_trials", "resources_per_trial", "seed")


@dataclass
class Scheduler:
    name: str = "fifo"  # fifo | asha
    max_t: int = 0  # asha: epochs at most (0 = the config's train.epochs)
    grace_period: int = 1
    reduction_factor: float = 2.0


@dataclass
class SearchSpace:
    name: str
    base: list[str]  # config names or paths (a single base is a list of one)
    experiment: str
    fixed: dict[str, Any]
    params: dict[str, dict[str, Any]]  # key -> {distribution: args}
    metric: str = "test/acc"
    mode: str = "max"
    scheduler: Scheduler = field(default_factory=Scheduler)
    num_samples: int = 1
    max_concurrent_trials: int = 0  # 0 = as many as the live nodes hold (orchestrator.sweep.concurrent_trials)
    cpu_per_trial: float = 1.0
    gpu_per_trial: float = 0.0
    sample_seed: int = 0  # ``tune.seed``: the sampled values (choice, uniform, ...) repeat with it


def resolve_space_path(name_or_path: str) -> Path:
    return resolve_named_file(name_or_path, SPACE_DIR, "search space")


def _check_distribution(key: str, spec: Any) -> None:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise UserError(f"param_space.{key}: must be one of {{grid|choice: [values]}}, "
                        f"{{uniform|loguniform: [low, high]}} or {{randint: [low, high]}}, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind in ("grid", "choice"):
        if not isinstance(args, list) or not args:
            raise UserError(f"param_space.{key}.{kind}: must be a non-empty list of values")
        return
    if not (isinstance(args, list) and len(args) == 2 and all(is_number(a) for a in args) and args[0] < args[1]):
        raise UserError(f"param_space.{key}.{kind}: must be [low, high] numbers with low < high, got {args!r}")
    if kind == "loguniform" and args[0] <= 0:
        raise UserError(f"param_space.{key}.loguniform: bounds must be > 0, got {args!r}")
    if kind == "randint" and not all(is_integer(a) for a in args):
        raise UserError(f"param_space.{key}.randint: bounds must be integers, got {args!r}")


def _candidate_values(spec: dict[str, Any]) -> list[Any]:
    kind, args = next(iter(spec.items()))
    if kind in ("grid", "choice"):
        return list(args)
    if kind == "randint":
        return [args[0], args[1] - 1]
    return [float(args[0]), float(args[1])]


def _override(key: str, value: Any) -> str:
    import yaml

    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def trial_config(space: SearchSpace, base: str, values: dict[str, Any], cli_overrides: list[str]) -> ExperimentConfig:
    """The config of one trial: base, then the space's fixed values, the sampled values, ``--set``."""
    resources = [_override("scaling.cpus_per_worker", space.cpu_per_trial),
                 _override("scaling.use_gpu", space.gpu_per_trial > 0)]
    if space.gpu_per_trial > 0:
        resources.append(_override("scaling.gpus_per_worker", space.gpu_per_trial))
    overrides = ([_override("mlflow.experiment", space.experiment)] + resources
                 + [_override(k, v) for k, v in space.fixed.items()] + [_override(k, v) for k, v in values.items()])
    return config_from_dict(apply_overrides(load_yaml(resolve_config_path(base)), overrides + cli_overrides))


def load_space(name_or_path: str, cli_overrides: list[str] | None = None) -> SearchSpace:
    path = resolve_space_path(name_or_path)
    data = load_yaml(path)
    unknown = [key for key in data if key not in TOP_LEVEL]
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r}; allowed: {', '.join(TOP_LEVEL)}")
    if "base" not in data:
        raise UserError(f"{path}: missing 'base' (a config name or path, or a list of them)")
    params = data.get("param_space") or {}
    if not isinstance(params, dict):
        raise UserError(f"{path}: param_space must be a mapping of config keys to distributions")
    for key, spec in params.items():
        _check_distribution(key, spec)
    tune = data.get("tune") or {}
    unknown = [key for key in tune if key not in TUNE_KEYS]
    if unknown:
        raise UserError(f"tune.{unknown[0]}: unknown key; allowed: {', '.join(TUNE_KEYS)}")
    scheduler = tune.get("scheduler", {"name": "fifo"})
    if not isinstance(scheduler, dict) or scheduler.get("name") not in ("fifo", "asha") or \
            set(scheduler) - {"name", "max_t", "grace_period", "reduction_factor"}:
        raise UserError(f"tune.scheduler: must be {{name: fifo}} or {{name: asha, max_t, grace_period, "
                        f"reduction_factor}}, got {scheduler!r}")
    for key, check, allowed in (("max_t", lambda v: is_integer(v) and v >= 0, "an integer >= 0 (0 = train.epochs)"),
                                ("grace_period", lambda v: is_integer(v) and v >= 1, "an integer >= 1"),
                                ("reduction_factor", lambda v: is_number(v) and v > 1, "a number > 1")):
        if key in scheduler and not check(scheduler[key]):
            raise UserError(f"tune.scheduler.{key}: must be {allowed}, got {scheduler[key]!r}")
    resources = tune.get("resources_per_trial", {}) or {}
    if set(resources) - {"cpu", "gpu"} or any(not is_number(v) or v < 0 for v in resources.values()):
        raise UserError(f"tune.resources_per_trial: must be {{cpu: number, gpu: number (fractions allowed)}}, "
                        f"got {resources!r}")
    if tune.get("mode", "max") not in ("max", "min"):
        raise UserError(f"tune.mode: must be 'max' or 'min', got {tune.get('mode')!r}")
    for key, least in (("num_samples", 1), ("max_concurrent_trials", 0), ("seed", 0)):
        value = tune.get(key, least)
        if not is_integer(value) or value < least:
            raise UserError(f"tune.{key}: must be an integer >= {least}, got {value!r}")
    base = params.pop("base", None)
    bases = base["grid"] if base else (data["base"] if isinstance(data["base"], list) else [data["base"]])
    space = SearchSpace(
        name=path.stem, base=bases, experiment=str(data.get("experiment") or f"curvlt-{path.stem}"),
        fixed=dict(data.get("fixed") or {}), params=params, metric=str(tune.get("metric", "test/acc")),
        mode=tune.get("mode", "max"), scheduler=Scheduler(**scheduler),
        num_samples=tune.get("num_samples", 1), max_concurrent_trials=tune.get("max_concurrent_trials", 0),
        cpu_per_trial=float(resources.get("cpu", 1)), gpu_per_trial=float(resources.get("gpu", 0)),
        sample_seed=tune.get("seed", 0))
    _validate_against_configs(space, cli_overrides or [])
    return space


def _validate_against_configs(space: SearchSpace, cli_overrides: list[str]) -> None:
    """Build a config for every base with every candidate value: bad keys or values fail now; and
    the metric against what the trials report (:func:`_check_metric`)."""
    bases = [trial_config(space, base, {}, cli_overrides) for base in space.base]
    _check_metric(space.metric, bases)
    max_t = space.scheduler.max_t or bases[0].train.epochs  # as the sweep's ASHA scheduler takes it
    if space.scheduler.name == "asha" and space.scheduler.grace_period > max_t:
        raise UserError(f"tune.scheduler.grace_period: must be at most max_t (or train.epochs) = {max_t}, "
                        f"got {space.scheduler.grace_period}")
    for base in space.base:
        for key, spec in space.params.items():
            for value in _candidate_values(spec):
                try:
                    trial_config(space, base, {key: value}, cli_overrides)
                except UserError as exc:
                    raise UserError(f"param_space.{key}: {exc}") from None


def _check_metric(metric: str, bases: list[ExperimentConfig]) -> None:
    """``tune.metric`` must be in every epoch's report: Tune stops the whole sweep, with a traceback,
    at the first report that lacks it (a misspelt name, or a geometry metric between geometry
    epochs). The names live with the evaluation, which imports SciPy and the geometry engine: so
    imported here, not when the command line starts."""
    from orchestrator.evaluation import EPOCH_METRICS, GEOMETRY_METRICS

    if metric in EPOCH_METRICS:
        return
    if metric in GEOMETRY_METRICS and all(base.eval.geometry_every == 1 for base in bases):
        return
    geometry = "" if metric in GEOMETRY_METRICS else f" ({', '.join(GEOMETRY_METRICS)})"
    raise UserError(f"tune.metric: must be reported at every epoch: one of {', '.join(EPOCH_METRICS)}, or a "
                    f"geometry metric{geometry} with eval.geometry_every 1; got {metric!r}")


def swept_keys(space: SearchSpace, bases: list[ExperimentConfig]) -> list[str]:
    """The config keys the sweep varies, which ``curvlt compare`` groups its runs by (besides the
    dataset): those of its ``param_space``, and every key on which two of its base configs for
    the same dataset differ (e.g. ``model.name``), except keys that do not change what a run
    computes (:data:`~orchestrator.config.NOT_COMPUTED`). Bases of different datasets are told
    apart by the dataset already. ``bases``: the trial config of each base, no value sampled. A key
    whose grid holds mappings (``loss: {grid: [{name: ce}, {name: ldam, drw_epoch: 160}]}``) stands
    for the keys those mappings set (``loss.name``, ``loss.drw_epoch``): the logged params."""
    params = [name for key, spec in space.params.items() for name in _set_keys(key, spec)]
    return list(dict.fromkeys([*params, *differing_keys([flatten(base.to_dict()) for base in bases])]))


def _set_keys(key: str, spec: dict[str, Any]) -> list[str]:
    """The dotted config keys that the values of ``spec`` set (see ``config._leaf_settings``)."""
    mappings = [value for value in _candidate_values(spec) if isinstance(value, dict)]
    if not mappings:
        return [key]
    return list(dict.fromkeys(name for value in mappings for name in flatten(value, f"{key}.")))


def tune_param_space(space: SearchSpace) -> dict[str, Any]:
    """Ray Tune's param space: one entry per key (dots kept in the names), plus the base config."""
    from ray import tune

    makers = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda a: tune.uniform(*a),
              "loguniform": lambda a: tune.loguniform(*a), "randint": lambda a: tune.randint(*a)}
    params = {key: makers[kind](args) for key, spec in space.params.items() for kind, args in spec.items()}
    params["base"] = tune.grid_search(list(space.base)) if len(space.base) > 1 else space.base[0]
    return params


def count_trials(space: SearchSpace) -> int:
    grids = [len(spec["grid"]) for spec in space.params.values() if "grid" in spec]
    return math.prod(grids) * len(space.base) * space.num_samples
