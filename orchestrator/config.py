"""Typed, strictly validated experiment configuration (SPEC §8; nanoGPT's strict overrides).

A config is YAML — a bundled name (``orchestrator/configs/NAME.yaml``) or a path — whose keys mirror
the dataclasses below; missing keys take the defaults. ``--set a.b=value`` overrides (value parsed as
YAML) go through the same checks. An unknown key or a wrong value stops with one line naming the key
and what is allowed. The resolved config is snapshotted into checkpoints and MLflow params.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from orchestrator.errors import UserError

CONFIG_DIR = Path(__file__).parent / "configs"
#: Config keys (prefixes) that do not change what a run computes: workers and devices,
#: checkpointing, progress lines, tracking location and name, where the data is read from. A resumed
#: run may change them, and sweeps are not compared by them.
NOT_COMPUTED = ("scaling.", "checkpoint.", "mlflow.", "train.progress_every_s", "dataset.root", "dataset.download")


@dataclass
class SyntheticConfig:
    """Classes sampled from round spheres (known curvature 1/r), SPEC §5 ``synthetic_manifolds``."""

    num_classes: int = 8
    manifold_dim: int = 2
    ambient_dim: int = 16
    radius_min: float = 0.5
    radius_max: float = 4.0
    noise: float = 0.0
    test_per_class: int = 100
    max_per_class: int = 500


@dataclass
class DatasetConfig:
    name: str = "digits_lt"
    root: str = "~/.cache/curvlt/data"
    imbalance_factor: float = 10.0
    download: bool = False
    many_threshold: int = 100  # Many: more than this many training images
    few_threshold: int = 20  # Few: fewer than this many
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


#: The losses whose margins and scale are defined on cosine logits: the ones ``model.head: auto``
#: gives the cosine head, and the only ones ``model.head: cosine`` is allowed with.
COSINE_HEAD_LOSSES = ("ldam",)


@dataclass
class ModelConfig:
    name: str = "mlp"
    # The classifier on the features: "linear" (W f + b), or "cosine" (cosines between the normalised
    # features and class weights), which LDAM's margins are defined on (Cao et al., NeurIPS 2019: the
    # margins are in cosine units, scaled by loss.ldam_s). "auto": cosine for ldam, linear otherwise.
    head: Literal["auto", "linear", "cosine"] = "auto"


@dataclass
class LossConfig:
    name: str = "ce"
    focal_gamma: float = 1.0
    ldam_max_m: float = 0.5
    ldam_s: float = 30.0
    drw_epoch: int = -1  # deferred re-weighting from this epoch; -1 = never
    la_tau: float = 1.0


@dataclass
class CRConfig:
    """Curvature regularization, SPEC §4: L = L_base + weight · L_CR."""

    weight: float = 0.0
    balance_weight: float = 0.0
    k: int = 10
    queue_size: int = 128
    start_epoch: int = 0
    tangent_dim: int | Literal["auto"] = "auto"
    cuda_graphs: bool = False  # on CUDA: CR's fixed-shape path replayed as CUDA graphs (curvature.graphed)
    every: int = 1  # lazy CR: the loss on one step in `every`, times `every` (curvature.regularizer)


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["step", "cosine", "constant"] = "cosine"
    milestones: list[int] = field(default_factory=list)  # for "step"
    gamma: float = 0.1  # lr factor at each milestone
    warmup_epochs: int = 0
    amp: bool = True  # bfloat16 autocast on GPU; ignored on CPU
    max_steps_per_epoch: int = 0  # 0 = the whole epoch; >0 shrinks a job for smoke tests
    progress_every_s: float = 30.0  # rank 0 prints a step-progress line this often; 0 = once per epoch


@dataclass
class EvalConfig:
    geometry_every: int = 5  # 0 = never; the last epoch is always measured when > 0
    geometry_max_points: int = 500  # per class, fixed subsample of the training set
    geometry_k: int = 10
    # "auto": each class at its own intrinsic dimension; an integer measures every class, and every
    # run, at one dimension, so that angle curvatures compare across runs whose auto dimensions differ
    geometry_tangent_dim: int | Literal["auto"] = "auto"


@dataclass
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # when use_gpu; fractions share a GPU between trials
    # DataLoader processes per Ray Train worker, which read, decode and augment the next batches
    # while the worker trains (see loader_workers for "auto")
    loader_workers: int | Literal["auto"] = "auto"


@dataclass
class CheckpointConfig:
    every: int = 1
    keep: int = 2
    max_failures: int = 3  # worker-group restarts before the run fails
    storage_path: str = ""  # Ray Train run folder; "" = ./curvlt_runs (use shared storage on clusters)


@dataclass
class MlflowConfig:
    experiment: str = "curvlt"
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db
    run_name: str = ""


@dataclass
class ExperimentConfig:
    seed: int = 0
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    cr: CRConfig = field(default_factory=CRConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Range checks: key -> (predicate, what is allowed). Types are checked from the annotations.
_POSITIVE = (lambda v: v > 0, "> 0")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_TANGENT_DIM = (lambda v: v == "auto" or v >= 1, "'auto' or an integer >= 1")
RANGES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "dataset.imbalance_factor": (lambda v: v >= 1, ">= 1 (1 = balanced)"),
    "dataset.many_threshold": _NON_NEGATIVE,
    "dataset.few_threshold": _NON_NEGATIVE,
    "dataset.synthetic.num_classes": (lambda v: v >= 2, ">= 2"),
    "dataset.synthetic.manifold_dim": _POSITIVE,
    "dataset.synthetic.ambient_dim": _POSITIVE,
    "dataset.synthetic.radius_min": _POSITIVE,
    "dataset.synthetic.radius_max": _POSITIVE,
    "dataset.synthetic.noise": _NON_NEGATIVE,
    "dataset.synthetic.test_per_class": _POSITIVE,
    "dataset.synthetic.max_per_class": _POSITIVE,
    "loss.focal_gamma": _NON_NEGATIVE,
    "loss.ldam_max_m": _POSITIVE,
    "loss.ldam_s": _POSITIVE,
    "loss.drw_epoch": (lambda v: v >= -1, ">= -1 (-1 = never)"),
    "cr.weight": _NON_NEGATIVE,
    "cr.balance_weight": _NON_NEGATIVE,
    "cr.k": (lambda v: v >= 3, ">= 3"),
    "cr.queue_size": _POSITIVE,
    "cr.start_epoch": _NON_NEGATIVE,
    "cr.every": _POSITIVE,
    "cr.tangent_dim": _TANGENT_DIM,
    "train.epochs": _POSITIVE,
    "train.batch_size": _POSITIVE,
    "train.lr": _POSITIVE,
    "train.momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "train.weight_decay": _NON_NEGATIVE,
    "train.gamma": _POSITIVE,
    "train.warmup_epochs": _NON_NEGATIVE,
    "train.max_steps_per_epoch": _NON_NEGATIVE,
    "train.progress_every_s": _NON_NEGATIVE,
    "eval.geometry_every": _NON_NEGATIVE,
    "eval.geometry_max_points": (lambda v: v >= 2, ">= 2"),
    "eval.geometry_k": (lambda v: v >= 3, ">= 3"),
    "eval.geometry_tangent_dim": _TANGENT_DIM,
    "scaling.num_workers": _POSITIVE,
    "scaling.cpus_per_worker": _POSITIVE,
    "scaling.gpus_per_worker": _POSITIVE,
    "scaling.loader_workers": (lambda v: v == "auto" or v >= 0, "'auto' or an integer >= 0"),
    "checkpoint.every": _POSITIVE,
    "checkpoint.keep": _POSITIVE,
    "checkpoint.max_failures": (lambda v: v >= -1, ">= -1 (-1 = unlimited)"),
    "mlflow.experiment": (lambda v: v.strip() != "", "a non-empty name"),
}


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        return f"a list of {_type_name(typing.get_args(annotation)[0])}"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return names.get(annotation, str(annotation))


def is_integer(value: Any) -> bool:
    """An integer as YAML gives it, not a bool (YAML's ``true`` is a Python int)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An integer or float as YAML gives it, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against ``annotation``; ints are accepted for floats, nothing else is converted."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        if value in typing.get_args(annotation):
            return value
    elif origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _coerce(value, option, key)
            except UserError:
                continue
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(item, typing.get_args(annotation)[0], key) for item in value]
    elif annotation is float:
        if is_number(value):
            return float(value)
    elif annotation is int:
        if is_integer(value):
            return value
    elif isinstance(value, annotation):
        return value
    raise UserError(f"{key}: must be {_type_name(annotation)}, got {value!r}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'}: must be a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [key for key in data if key not in names]
    if unknown:
        raise UserError(f"{prefix}{unknown[0]}: unknown key; allowed here: {', '.join(names)}")
    values = {}
    for name in names:
        if name not in data:
            continue
        key = prefix + name
        if dataclasses.is_dataclass(hints[name]):
            values[name] = _build(hints[name], data[name] or {}, key + ".")
        else:
            values[name] = _coerce(data[name], hints[name], key)
            check = RANGES.get(key)
            if check and not check[0](values[name]):
                raise UserError(f"{key}: must be {check[1]}, got {values[name]!r}")
    return cls(**values)


def _cross_checks(config: ExperimentConfig) -> None:
    if config.dataset.few_threshold > config.dataset.many_threshold:
        raise UserError("dataset.few_threshold: must not exceed dataset.many_threshold")
    synthetic = config.dataset.synthetic
    if synthetic.ambient_dim <= synthetic.manifold_dim:
        raise UserError(f"dataset.synthetic.ambient_dim: must be above dataset.synthetic.manifold_dim = "
                        f"{synthetic.manifold_dim} (a {synthetic.manifold_dim}-sphere lies in "
                        f"{synthetic.manifold_dim + 1} dimensions), got {synthetic.ambient_dim}")
    if synthetic.radius_min > synthetic.radius_max:
        raise UserError("dataset.synthetic.radius_min: must not exceed dataset.synthetic.radius_max")
    for dim_key, k_key, dim, k in (("cr.tangent_dim", "cr.k", config.cr.tangent_dim, config.cr.k),
                                   ("eval.geometry_tangent_dim", "eval.geometry_k", config.eval.geometry_tangent_dim,
                                    config.eval.geometry_k)):
        if dim != "auto" and dim > k:
            raise UserError(f"{dim_key}: must be 'auto' or at most {k_key} = {k}")
    if config.model.head == "cosine" and config.loss.name not in COSINE_HEAD_LOSSES:
        raise UserError(f"model.head: cosine needs loss.name {' or '.join(COSINE_HEAD_LOSSES)}, which scales the "
                        f"cosine logits (in [-1, 1]) by loss.ldam_s; got loss.name {config.loss.name}")
    if config.cr.weight > 0 and config.cr.start_epoch >= config.train.epochs:
        raise UserError(f"cr.start_epoch: must be below train.epochs = {config.train.epochs} when cr.weight > 0 "
                        f"(epochs count from 0), got {config.cr.start_epoch}: CR would never apply")
    if config.train.warmup_epochs >= config.train.epochs and config.train.warmup_epochs > 0:
        raise UserError(f"train.warmup_epochs: must be below train.epochs = {config.train.epochs}, got "
                        f"{config.train.warmup_epochs}: the learning rate would never reach train.lr (for a "
                        f"shorter trial run, set train.warmup_epochs to 0 too)")
    late = [milestone for milestone in config.train.milestones if milestone >= config.train.epochs]
    if config.train.schedule == "step" and late:
        raise UserError(f"train.milestones: must be below train.epochs = {config.train.epochs} (epochs count from 0), "
                        f"got {late[0]}: the learning rate would never drop there")
    if config.eval.geometry_every > 0 and config.eval.geometry_max_points <= config.eval.geometry_k:
        raise UserError(f"eval.geometry_max_points: must be above eval.geometry_k = {config.eval.geometry_k} (a class "
                        f"needs k + 1 points to be measured), got {config.eval.geometry_max_points}")


def _check_registered_names(config: ExperimentConfig) -> None:
    """The dataset, model and loss names against their registries, so that a misspelt name stops
    here, in the driver and for every candidate of a sweep, rather than in each Ray Train worker
    and again at each of its ``checkpoint.max_failures`` restarts. The registries live with their
    factories, which import torch, so they are imported when a config is checked, not with this
    module."""
    from orchestrator.data import DATASETS
    from orchestrator.losses import LOSSES
    from orchestrator.models import MODELS

    for registry, name in ((DATASETS, config.dataset.name), (MODELS, config.model.name), (LOSSES, config.loss.name)):
        registry.get(name)


def is_uri(location: str) -> bool:
    """A storage location such as s3://bucket/runs (``checkpoint.storage_path``; a checkpoint's
    location) rather than a local folder."""
    return "://" in location


def model_head(config: ExperimentConfig) -> Literal["linear", "cosine"]:
    """The classifier ``model.head`` names, with "auto" resolved: cosine for LDAM, linear otherwise."""
    if config.model.head == "auto":
        return "cosine" if config.loss.name in COSINE_HEAD_LOSSES else "linear"
    return config.model.head


def check_feature_dim(config: ExperimentConfig, feature_dim: int) -> None:
    """The fixed tangent dimensions against the model's feature dimension, which only the built
    model knows: a tangent space cannot have more dimensions than the space it lies in (SPEC §3.3).
    Called by the driver before any worker starts and by each worker before its first step."""
    for key, dim in (("cr.tangent_dim", config.cr.tangent_dim),
                     ("eval.geometry_tangent_dim", config.eval.geometry_tangent_dim)):
        if dim != "auto" and dim > feature_dim:
            raise UserError(f"{key}: must be 'auto' or at most model {config.model.name}'s feature dimension "
                            f"{feature_dim}, got {dim}")


def resolve_named_file(name_or_path: str, folder: Path, kind: str) -> Path:
    """A bundled file's name (``digits_lt`` -> ``folder/digits_lt.yaml``) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"{path}: no such {kind} file")
        return path
    bundled = folder / f"{name_or_path}.yaml"
    if not bundled.is_file():
        names = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        raise UserError(f"{name_or_path}: not a {kind} file nor a bundled {kind}; bundled: {names}")
    return bundled


def resolve_config_path(name_or_path: str) -> Path:
    return resolve_named_file(name_or_path, CONFIG_DIR, "config")


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML{_where(exc)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of config keys")
    return data


def _where(error: yaml.YAMLError) -> str:
    """Where the YAML parser stopped and why, e.g. `` at line 3, column 2: expected <block end>,
    but found '<block mapping start>'``; its first line alone ("while parsing a block mapping")
    names neither."""
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {problem}" if problem else where


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> (``"a.b"``, YAML-parsed value)."""
    if "=" not in text:
        raise UserError(f"--set {text}: expected key=value, e.g. --set train.epochs=3")
    key, raw = text.split("=", 1)
    if "" in key.strip().split("."):
        raise UserError(f"--set {text}: expected key=value with a dotted key, e.g. --set train.epochs=3")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _leaf_settings(key: str, value: Any) -> list[tuple[str, Any]]:
    """A mapping value sets each key it names within the section, ``loss={name: ldam, drw_epoch:
    160}`` as ``loss.name=ldam`` and ``loss.drw_epoch=160``, and leaves the section's other keys as
    they were: so a sweep can vary several keys together (a grid over mappings) without restating
    the rest of the section. No config field holds a mapping, so the reading is never ambiguous."""
    if isinstance(value, dict):
        return [leaf for sub, inner in value.items() for leaf in _leaf_settings(f"{key}.{sub}", inner)]
    return [(key, value)]


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (a copy); unknown keys are caught later by the builder."""
    data = _deep_copy(data)
    settings = [leaf for text in overrides for leaf in _leaf_settings(*parse_override(text))]
    for key, value in settings:
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"--set {key}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _deep_copy(data: Any) -> Any:
    return {k: _deep_copy(v) for k, v in data.items()} if isinstance(data, dict) else data


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    config = _build(ExperimentConfig, data, "")
    _cross_checks(config)
    _check_registered_names(config)
    return config


def load_config(name_or_path: str, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load, override and validate an experiment config."""
    data = load_yaml(resolve_config_path(name_or_path))
    return config_from_dict(apply_overrides(data, overrides or []))


def add_overrides_argument(parser) -> None:
    """The ``--set KEY=VALUE`` option shared by ``curvlt train`` and ``curvlt tune``."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set cr.weight=0.5 or --set train.epochs=2 (repeatable)")


def differing_keys(configs: typing.Iterable[dict[str, Any]]) -> list[str]:
    """Flattened config keys (first-seen order) that hold more than one value among the configs of
    one dataset, except those that do not change what a run computes (:data:`NOT_COMPUTED`): the
    keys that tell runs which are not repeats of one another apart. Configs of different datasets
    are told apart by the dataset already; a config that lacks a key (the params of a run of an
    older curvlt) does not make it differ. Used for a sweep's base configs and for logged runs."""
    values: dict[tuple[Any, str], list[Any]] = {}
    for flat in configs:
        for key, value in flat.items():
            if key != "dataset.name" and not key.startswith(NOT_COMPUTED):
                seen = values.setdefault((flat.get("dataset.name"), key), [])
                if value not in seen:
                    seen.append(value)
    return list(dict.fromkeys(key for (_, key), seen in values.items() if len(seen) > 1))


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists become strings), for MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def loader_workers(scaling: ScalingConfig) -> int:
    """DataLoader processes per Ray Train worker, ``scaling.loader_workers`` with "auto" resolved. On
    a GPU worker: its CPUs but the one that drives the GPU, so that decoding and augmenting the next
    batches (ImageNet's JPEGs; CIFAR's crops, about 10 ms per batch of 128 on one core) overlap the
    step instead of adding to it. On a CPU worker: none, since its CPUs already run the step."""
    if scaling.loader_workers == "auto":
        return max(0, int(scaling.cpus_per_worker) - 1) if scaling.use_gpu else 0
    return scaling.loader_workers
