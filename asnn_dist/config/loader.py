"""Load an ExperimentConfig from YAML: ``extends`` chains, dotted overrides, clear errors.

Why our own error text: pydantic's default report is long and does not suggest the key the
user meant; one line naming the field, the bad value and what is allowed is what people fix
fastest.
"""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any, Iterable, Optional, get_args

import yaml
from pydantic import BaseModel, ValidationError

from asnn_dist.config.schema import ExperimentConfig, TrackingConfig
from asnn_dist.errors import ConfigError

SECRET_KEY_HINTS = ("secret", "password", "access_key", "token", "credential")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found; check the path")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``over`` wins, mappings merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_config_tree(path: str | os.PathLike[str], _seen: Optional[set[Path]] = None) -> dict[str, Any]:
    """Read a YAML file and the chain of files it ``extends`` (paths relative to the file)."""
    p = Path(path).resolve()
    seen = _seen or set()
    if p in seen:
        raise ConfigError(f"config 'extends' cycle through {str(p)!r}")
    seen.add(p)
    data = _read_yaml(p)
    parents = data.pop("extends", None)
    if parents is None:
        return data
    merged: dict[str, Any] = {}
    for parent in [parents] if isinstance(parents, str) else list(parents):
        merged = deep_merge(merged, read_config_tree(p.parent / parent, seen))
    return deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``optim.lr=1e-3`` -> (["optim", "lr"], 0.001); values are parsed as YAML scalars."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"bad override {text!r}; expected dotted.key=value, e.g. optim.lr=1e-3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    out = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"bad override {text!r}: {'.'.join(path[: i + 1])} is a value, not a section"
                )
            node = child
        node[path[-1]] = value
    return out


def _model_at(path: tuple[Any, ...]) -> Optional[type[BaseModel]]:
    """The pydantic section class that holds the field at ``path`` (for key suggestions)."""
    model: type[BaseModel] = ExperimentConfig
    for part in path[:-1]:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        sub = next(
            (a for a in (field.annotation, *get_args(field.annotation)) if isinstance(a, type) and issubclass(a, BaseModel)),
            None,
        )
        if sub is None:
            return None
        model = sub
    return model


def _allowed_text(err: dict[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    if "expected" in ctx:
        return f"allowed: {ctx['expected']}"
    for key, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if key in ctx:
            return f"allowed: {word} {ctx[key]}"
    if "pattern" in ctx:
        return f"allowed: text matching {ctx['pattern']}"
    return ""


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: field path, bad value, what is allowed (and a typo suggestion)."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = ".".join(str(p) for p in loc) or "<config>"
        if err["type"] == "extra_forbidden":
            model = _model_at(loc)
            keys = sorted(model.model_fields) if model else []
            close = difflib.get_close_matches(str(loc[-1]), keys, n=1)
            hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?" if close else ""
            lines.append(f"{where}: unknown key{hint} (allowed keys: {', '.join(keys)})")
            continue
        if err["type"] in ("unknown_option", "option_from_config"):  # schema.ModelConfig: "<key>: ..."
            lines.append(f"{where}.{err['msg']}")
            continue
        value = err.get("input")
        msg = err["msg"].removeprefix("Value error, ")
        allowed = _allowed_text(err)
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        lines.append(f"{where}: bad value {shown}: {msg}" + (f" ({allowed})" if allowed and allowed not in msg else ""))
    return "invalid config: " + "; ".join(lines)


def _reject_secrets(data: Any, path: str = "") -> None:
    if isinstance(data, dict):
        for key, value in data.items():
            where = f"{path}.{key}" if path else str(key)
            if any(h in str(key).lower() for h in SECRET_KEY_HINTS):
                raise ConfigError(
                    f"{where}: credentials do not belong in configs; use the standard environment "
                    "(AWS_* variables, ~/.aws profile, MLFLOW_TRACKING_* variables) instead"
                )
            _reject_secrets(value, where)


def validate_config(data: dict[str, Any], base_dir: Optional[Path] = None) -> ExperimentConfig:
    _reject_secrets(data)
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    if cfg.tune is not None and cfg.tune.space:  # every key and value of the search space, up front
        from asnn_dist.config.space import check_space

        check_space(cfg)
    return resolve_paths(cfg, base_dir or Path.cwd())


def load_config(path: Optional[str | os.PathLike[str]] = None, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Read, merge, override and validate; relative paths become absolute (workers run elsewhere)."""
    data = read_config_tree(path) if path else {}
    return validate_config(apply_overrides(data, overrides))


def _is_url(text: str) -> bool:
    return "://" in text


def _tracking_uri_from_env() -> Optional[str]:
    """MLFLOW_TRACKING_URI, as a cluster sets it on its nodes (checked like tracking.uri)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or None
    try:
        return TrackingConfig(uri=uri).uri
    except ValidationError:
        raise ConfigError("MLFLOW_TRACKING_URI: credentials in the tracking URI; put them in "
                          "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD instead") from None


def resolve_paths(cfg: ExperimentConfig, base_dir: Path) -> ExperimentConfig:
    """Fill path defaults under ``workdir`` and make every local path absolute."""
    cfg = cfg.model_copy(deep=True)
    work = Path(cfg.workdir)
    work = work if work.is_absolute() else (base_dir / work)
    cfg.workdir = str(work.resolve())
    if cfg.data.root is None:
        cfg.data.root = str(Path(cfg.workdir) / "shards" / cfg.data.source)
    elif not _is_url(cfg.data.root):
        cfg.data.root = str((base_dir / cfg.data.root).resolve())
    if cfg.run.storage_path is None:
        cfg.run.storage_path = str(Path(cfg.workdir) / "ray_results")
    elif not _is_url(cfg.run.storage_path):
        cfg.run.storage_path = str((base_dir / cfg.run.storage_path).resolve())
    if cfg.tracking.uri is None:
        cfg.tracking.uri = _tracking_uri_from_env() or f"sqlite:///{Path(cfg.workdir) / 'mlflow.db'}"
    if cfg.tracking.artifact_location is None and not cfg.tracking.uri.startswith(("http://", "https://")):
        cfg.tracking.artifact_location = str(Path(cfg.workdir) / "mlartifacts")
    return cfg


def dump_config(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML (what is saved with every run)."""
    return yaml.safe_dump(_plain(cfg), sort_keys=False)


def _plain(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as JSON-able data; a training run's (absent) ``tune`` section is left out."""
    data = cfg.model_dump(mode="json")
    if data.get("tune") is None:
        data.pop("tune", None)
    return data


def flatten_config(cfg: ExperimentConfig) -> dict[str, str]:
    """Dotted key -> string value, for MLflow params."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = str(node)

    walk(_plain(cfg), "")
    return out
