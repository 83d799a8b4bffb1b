"""Checking what users write: strict config sections, YAML files, ``--set`` overrides and the
parameters of registered components, with errors that name the key and what would be right.

The training config (:mod:`manytask.config`) and the merge config (:mod:`manytask.merge.config`)
are built on this module; it defines no config of its own, so that reading a merge config does
not build the training one.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from manytask.errors import ConfigError


class StrictModel(BaseModel):
    """A config section that refuses unknown keys and checks assignments."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _describe_type(error: Mapping[str, Any]) -> str:
    kind = str(error.get("type", ""))
    words = {
        "int_parsing": "an integer",
        "int_type": "an integer",
        "int_from_float": "an integer",
        "float_parsing": "a number",
        "float_type": "a number",
        "bool_parsing": "true or false",
        "bool_type": "true or false",
        "string_type": "a string",
        "list_type": "a list",
        "dict_type": "a mapping",
        "model_type": "a mapping",
        "model_attributes_type": "a mapping",
        "literal_error": "one of the allowed values",
    }
    return words.get(kind, "")


def _fields_at(model: type[BaseModel], loc: Sequence[str | int]) -> list[str] | None:
    """The valid keys of the (nested) model that ``loc`` points into."""
    current: Any = model
    for part in loc:
        if not (inspect.isclass(current) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [
            a for a in (annotation, *args) if inspect.isclass(a) and issubclass(a, BaseModel)
        ]
        if not candidates:
            # a dict of models (tasks: {name: TaskConfig}) skips one level of the path
            nested = [a for a in args if getattr(a, "__args__", None)]
            candidates = [
                b
                for a in nested
                for b in a.__args__
                if inspect.isclass(b) and issubclass(b, BaseModel)
            ]
            if candidates:
                current = candidates[0]
                continue
            return None
        current = candidates[0]
    if inspect.isclass(current) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return None


def format_validation_error(
    exc: ValidationError, where: str, model: type[BaseModel] | None = None
) -> str:
    """One readable line per problem: the key, what is wrong, and what would be right."""
    lines = []
    for error in exc.errors():
        loc = [part for part in error["loc"]]
        key = ".".join(str(p) for p in loc) or "(top level)"
        if error["type"] == "extra_forbidden":
            valid = _fields_at(model, loc[:-1]) if model is not None else None
            # tasks.<name>.<key> paths carry a free-form task name
            if valid is None and model is not None and len(loc) >= 2:
                valid = _fields_at(model, [loc[0], *loc[2:-1]])
            choices = f"; valid keys here: {', '.join(valid)}" if valid else ""
            close = difflib.get_close_matches(str(loc[-1]), valid or [], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            lines.append(f"unknown key '{key}' in {where}{hint}{choices}")
        elif error["type"] == "missing":
            lines.append(f"missing required key '{key}' in {where}")
        else:
            expected = _describe_type(error)
            got = error.get("input")
            detail = f"expected {expected}" if expected else str(error["msg"]).lower()
            if error["type"] == "literal_error":
                detail = str(error["msg"]).replace("Input should be", "expected")
            lines.append(f"bad value for '{key}' in {where}: {detail}, got {got!r}")
    return "\n".join(lines)


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping at the top of a YAML file; a missing file or another shape is a ConfigError."""
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides; values are parsed as YAML (``3``, ``true``, ``[1,2]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        dotted, raw = item.split("=", 1)
        keys = [k for k in dotted.strip().split(".") if k]
        if not keys:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {dotted}: '{key}' holds a value, not a section")
            node = child
        node[keys[-1]] = value
    return data


def validate_params(
    obj: Callable[..., Any],
    params: Mapping[str, Any],
    where: str,
    reserved: Mapping[str, Any] = {},
) -> dict[str, Any]:
    """Check user parameters against the signature of ``obj`` (a class or function).

    Parameters supplied by manytask itself (``reserved``) and ``*args``/``**kwargs`` are not
    user-settable. Returns the parameters converted to the annotated types.
    """
    target = obj.__init__ if inspect.isclass(obj) else obj
    signature = inspect.signature(target)
    try:
        hints = inspect.get_annotations(getattr(target, "__func__", target), eval_str=True)
    except (NameError, TypeError):
        hints = {}
    fields: dict[str, Any] = {}
    for pname, param in signature.parameters.items():
        if pname in ("self", *reserved) or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.kind is param.POSITIONAL_ONLY:
            continue
        annotation = hints.get(pname, Any)
        default = ... if param.default is param.empty else param.default
        fields[pname] = (annotation, default)
    model = create_model(
        f"Params_{where}",
        __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True),
        **fields,
    )
    try:
        validated = model.model_validate(dict(params))
    except ValidationError as exc:
        message = format_validation_error(exc, where, model)
        raise ConfigError(message) from None
    return {k: getattr(validated, k) for k in params}
