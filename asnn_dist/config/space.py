"""The search space of ``asnn-dist tune``: parse, validate and sample it before any trial starts.

Why we sample ourselves (random and grid search) instead of handing Tune its domains: every
trial config must pass the same schema as ``asnn-dist train`` *before* its trial starts. Tune's
grid search cannot skip combinations the schema forbids (``encoding.direct_steps`` >
``encoding.num_steps``), and a random draw that is forbidden should be redrawn, not crash a trial.
So the points are drawn here with a seeded RNG, each validated, and Tune runs the list of valid
points (a ``grid_search`` over them): the same seed always gives the same trials, and a resumed
search restores exactly that list from its experiment state.

A space maps dotted config keys to a domain or a fixed value::

    encoding.num_steps: {grid: [2, 4]}          # every value, crossed with the other grids
    encoding.scheme: {choice: [threshold, bitplane]}
    optim.lr: {loguniform: [1.0e-3, 1.0e-2]}    # uniform / loguniform: [low, high]
    optim.epochs: {randint: [2, 6]}             # integers low..high-1 (as Tune's randint)
    neuron.adaptive: false                      # fixed
    encoding: {grid: [{num_steps: 2, direct_steps: 2}, {num_steps: 4, direct_steps: 1}]}  # sections merge

Nested mappings (``encoding: {num_steps: {grid: [...]}}``, as ``--set tune.space.encoding.num_steps=...``
writes them) are read as the same dotted keys.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import BaseModel, ValidationError

from asnn_dist.config.schema import DOMAIN_KINDS, ExperimentConfig
from asnn_dist.errors import ConfigError

RANDOM_KINDS = ("choice", "uniform", "loguniform", "randint")
MAX_GRID_POINTS = 10_000
NOT_SEARCHABLE = ("tune", "run.name", "workdir")


@dataclass(frozen=True)
class Domain:
    """One searched key: ``kind`` is a DOMAIN_KINDS word or ``fixed``."""

    key: str
    kind: str
    values: tuple[Any, ...] = ()
    low: Optional[float] = None
    high: Optional[float] = None

    def candidates(self) -> list[Any]:
        """The values to check one by one: every listed value, or both ends of a range."""
        if self.kind in ("fixed", "grid", "choice"):
            return list(self.values)
        if self.kind == "randint":
            return [int(self.low), int(self.high) - 1]
        return [self.low, self.high]

    def draw(self, rng: random.Random) -> Any:
        if self.kind == "choice":
            return copy.deepcopy(rng.choice(self.values))
        if self.kind == "uniform":
            return rng.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        if self.kind == "randint":
            return rng.randrange(int(self.low), int(self.high))
        raise ValueError(f"{self.key}: {self.kind} values are not drawn")


@dataclass
class Sampled:
    """The trials of a search: valid points, and what was left out (and why)."""

    points: list[dict[str, Any]]
    forbidden_grid: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    resampled: int = 0
    skipped: int = 0

    def notes(self) -> list[str]:
        out = []
        if self.forbidden_grid:
            reasons: dict[str, list[str]] = {}
            for p, why in self.forbidden_grid:
                reasons.setdefault(why, []).append(_short(p))
            shown = "; ".join(f"{', '.join(pts)} ({why})" for why, pts in reasons.items())
            out.append(f"{len(self.forbidden_grid)} grid point(s) the config forbids are left out: {shown}")
        if self.resampled or self.skipped:
            out.append(f"random draws the config forbids: {self.resampled} redrawn, {self.skipped} skipped")
        return out


def _short(point: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in point.items()) + "}"


# --- parsing ----------------------------------------------------------------------------------


def _field_at(path: list[str]) -> tuple[Optional[type[BaseModel]], Any]:
    """(section class, field info) of a dotted path in the schema; (None, None) when unknown."""
    model: type[BaseModel] = ExperimentConfig
    info = None
    for i, part in enumerate(path):
        info = model.model_fields.get(part)
        if info is None:
            return None, None
        sub = info.annotation if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel) else None
        if i < len(path) - 1:
            if sub is None:
                return None, info
            model = sub
    sub = info.annotation if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel) else None
    return sub, info


def _is_domain(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DOMAIN_KINDS


def flatten_space(space: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested or dotted space -> ``{dotted key: domain or fixed value}`` (later keys win)."""
    out: dict[str, Any] = {}
    for key, value in space.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        section, _ = _field_at(dotted.split("."))
        if isinstance(value, dict) and not _is_domain(value) and section is not None:
            out.update(flatten_space(value, dotted))
        else:
            out[dotted] = value
    return out


def parse_domain(key: str, raw: Any) -> Domain:
    """One space entry -> Domain; ConfigError naming ``tune.space.<key>`` when malformed."""
    where = f"tune.space.{key}"
    if not _is_domain(raw):
        if isinstance(raw, dict) and any(k in DOMAIN_KINDS for k in raw):
            raise ConfigError(f"invalid config: {where}: bad value {raw!r}: a domain has exactly one of "
                              f"{', '.join(DOMAIN_KINDS)}")
        return Domain(key, "fixed", (raw,))
    kind, arg = next(iter(raw.items()))
    if kind in ("grid", "choice"):
        if not isinstance(arg, list) or not arg:
            raise ConfigError(f"invalid config: {where}.{kind}: bad value {arg!r}: needs a non-empty list of values")
        return Domain(key, kind, tuple(arg))
    if not (isinstance(arg, list) and len(arg) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                            for v in arg)):
        raise ConfigError(f"invalid config: {where}.{kind}: bad value {arg!r}: needs [low, high] numbers")
    low, high = arg
    if not low < high:
        raise ConfigError(f"invalid config: {where}.{kind}: bad value {arg!r}: low must be below high")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"invalid config: {where}.loguniform: bad value {arg!r}: low must be > 0")
    if kind == "randint" and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"invalid config: {where}.randint: bad value {arg!r}: needs integers [low, high)")
    return Domain(key, kind, low=low, high=high)


def parse_space(cfg: ExperimentConfig) -> list[Domain]:
    """The space of ``cfg.tune`` as domains, keys checked against the schema (typos suggested)."""
    assert cfg.tune is not None
    domains = []
    for key, raw in flatten_space(cfg.tune.space).items():
        if any(key == bad or key.startswith(bad + ".") for bad in NOT_SEARCHABLE):
            raise ConfigError(f"invalid config: tune.space.{key}: not searchable (run names and the search "
                              "itself are set per trial)")
        domains.append(parse_domain(key, raw))
    if cfg.tune.search.name == "grid":
        drawn = [d.key for d in domains if d.kind in RANDOM_KINDS]
        if drawn:
            raise ConfigError(f"invalid config: tune.search.name: grid search takes grid and fixed values only; "
                              f"{', '.join(drawn)} are drawn at random (use search.name=random)")
    return domains


# --- building trial configs ---------------------------------------------------------------------


def base_data(cfg: ExperimentConfig) -> dict[str, Any]:
    """The training config every trial starts from (no ``tune`` section, no run name)."""
    data = cfg.model_dump(mode="json")
    data.pop("tune", None)
    data["run"]["name"] = None
    return data


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in nested data; a mapping given to a section merges into it."""
    from asnn_dist.config.loader import deep_merge

    *parents, last = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        node[last] = deep_merge(node[last], value)
    else:
        node[last] = copy.deepcopy(value)


def _validate(data: dict[str, Any]) -> tuple[Optional[ExperimentConfig], Optional[ValidationError]]:
    try:
        return ExperimentConfig.model_validate(data), None
    except ValidationError as exc:
        return None, exc


def _why(exc: ValidationError) -> str:
    from asnn_dist.config.loader import format_validation_error

    return format_validation_error(exc).removeprefix("invalid config: ")


def check_values(base: dict[str, Any], domains: list[Domain]) -> None:
    """Every value (or range end) of every key, alone on the base config: unknown keys and bad
    values fail here. Errors that come from combining fields are left to ``sample_points``."""
    for dom in domains:
        path = tuple(dom.key.split("."))
        for value in dom.candidates():
            data = copy.deepcopy(base)
            set_dotted(data, dom.key, value)
            _, exc = _validate(data)
            if exc is None:
                continue
            own = [e for e in exc.errors() if tuple(map(str, e["loc"]))[: len(path)] == path
                   or e["type"] == "extra_forbidden"]
            if own:
                raise ConfigError(f"invalid config: tune.space: {_why(exc)}")


def grid_points(domains: list[Domain]) -> list[dict[str, Any]]:
    """The cross product of the grid (and fixed) values, in the order they are written."""
    grids = [d for d in domains if d.kind in ("grid", "fixed")]
    count = math.prod(len(d.values) for d in grids)
    if count > MAX_GRID_POINTS:
        raise ConfigError(f"invalid config: tune.space: {count} grid points (more than {MAX_GRID_POINTS}); "
                          "draw some keys at random (choice) instead")
    return [dict(zip([d.key for d in grids], combo)) for combo in itertools.product(*[d.values for d in grids])]


def sample_points(cfg: ExperimentConfig, domains: Optional[list[Domain]] = None) -> Sampled:
    """Valid trial points (grid x num_samples draws), forbidden grid points and draws counted."""
    assert cfg.tune is not None
    domains = parse_space(cfg) if domains is None else domains
    base = base_data(cfg)
    check_values(base, domains)
    drawn = [d for d in domains if d.kind in RANDOM_KINDS]
    rng = random.Random(cfg.tune.search.seed)
    out = Sampled(points=[])
    for point in grid_points(domains):
        data = copy.deepcopy(base)
        for key, value in point.items():
            set_dotted(data, key, value)
        _, exc = _validate(data)
        if exc is not None and not drawn:
            out.forbidden_grid.append((point, _why(exc)))
            continue
        valid_any, skipped_before = False, out.skipped
        for _ in range(cfg.tune.num_samples):
            for attempt in range(cfg.tune.search.max_resample + 1):
                full = {**point, **{d.key: d.draw(rng) for d in drawn}}
                trial = copy.deepcopy(data)
                for d in drawn:
                    set_dotted(trial, d.key, full[d.key])
                if _validate(trial)[1] is None:
                    out.points.append(full)
                    out.resampled += attempt
                    valid_any = True
                    break
            else:
                out.skipped += 1
        if not valid_any and exc is not None:  # no draw mends this grid point: it is the grid's fault
            out.skipped = skipped_before
            out.forbidden_grid.append((point, _why(exc)))
    if not out.points:
        raise ConfigError("invalid config: tune.space: no point of the space is a valid config: "
                          + " | ".join(out.notes()))
    return out


def trial_config(cfg: ExperimentConfig, point: dict[str, Any], run_name: str) -> ExperimentConfig:
    """The training config of one trial: the base config with the point's values and a run name."""
    from asnn_dist.config.loader import validate_config

    data = base_data(cfg)
    for key, value in point.items():
        set_dotted(data, key, value)
    data["run"]["name"] = run_name
    return validate_config(data)


def check_space(cfg: ExperimentConfig) -> Sampled:
    """What ``load_config`` runs for a config with a space: keys, values and at least one valid
    point (optuna draws adaptively, so only its keys and ranges are checked here)."""
    domains = parse_space(cfg)
    if cfg.tune is not None and cfg.tune.search.name == "optuna":
        check_values(base_data(cfg), domains)
        return Sampled(points=[])
    return sample_points(cfg, domains)
