"""Load a :class:`Config` from YAML plus dotted ``key=value`` overrides; validate once.

    cfg = load_config("examples/configs/cpu_demo.yaml", ["trainer.steps=20"])

Unknown keys and bad values are errors (:class:`ConfigError`) that name the key and
the allowed keys or values. The result is frozen and never mutated.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from megatron_rpp.config.schema import Config


class ConfigError(ValueError):
    """A configuration key or value is invalid."""


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (parsed from its source)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(path: str, value: Any, typ: Any) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif typ is dict:
        if isinstance(value, dict):
            return dict(value)
    name = getattr(typ, "__name__", str(typ))
    raise ConfigError(f"{path}: expected {name}, got {value!r} ({type(value).__name__})")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key '{where}{unknown[0]}'; allowed keys{' of ' + prefix if prefix else ''}: "
            + ", ".join(names)
        )
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        path = f"{prefix}.{name}" if prefix else name
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, data[name], path)
        else:
            kwargs[name] = _coerce(path, data[name], typ)
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {p!r} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"trainer.steps=20"`` -> ``("trainer.steps", 20)`` (values parsed as YAML scalars)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse value: {e}") from None
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (optional) + dotted overrides -> validated, frozen :class:`Config`."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        with open(p) as f:
            try:
                tree = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{p}: invalid YAML: {e}") from None
    for ov in overrides or []:
        key, value = parse_override(ov)
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree, "")
    from megatron_rpp.config.validate import validate

    validate(cfg)
    return cfg


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (every field, defaults included) as YAML."""
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)


def help_text() -> str:
    """Every config field with its type, default, docstring and allowed range (for ``--help``)."""
    from megatron_rpp.config.validate import allowed_range

    lines = []
    for sec in dataclasses.fields(Config):
        cls = _hints(Config)[sec.name]
        lines.append(f"{sec.name}:  {field_docs(Config).get(sec.name, '')}")
        docs = field_docs(cls)
        defaults = cls()
        for f in dataclasses.fields(cls):
            typ = getattr(_hints(cls)[f.name], "__name__", "")
            lines.append(f"  {sec.name}.{f.name} ({typ}, default {getattr(defaults, f.name)!r})")
            allowed = allowed_range(f"{sec.name}.{f.name}")
            text = docs.get(f.name, "") + (f" Allowed: {allowed}." if allowed else "")
            lines.append(textwrap.fill(text, 92, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)
