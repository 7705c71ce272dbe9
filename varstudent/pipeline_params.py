"""params.yaml <-> Kubeflow pipeline parameters, derived from the config dataclasses (no kfp import here).

Every setting of every section except `kfp` (how the pipeline is built) and `tune` (the study; parameters of the
tuning pipeline only) becomes one pipeline parameter named `section_key` (`seed` stays `seed`) with its
params.yaml value as default. Scalars keep their type (int, float, bool, str); list settings (`export.formats`)
are JSON strings, e.g. '["compact", "onnx"]', because a KFP parameter substituted into a string renders lists
in a backend-specific way.

A component receives its settings as one string of `section.key=VALUE` lines, where the pipeline fills VALUE
from the parameters at run time; `params_from_settings` turns it back into validated Params, reading each
value by the type its dataclass field declares (so `1e-05` stays a float and `True`/`true` a bool).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from typing import Any

from varstudent.config import Params, _build
from varstudent.errors import ConfigError

# never pipeline parameters: `kfp` says how the pipeline is built
BUILD_SECTIONS = ("kfp",)
# parameters of the tuning pipeline only: `tune` configures a study (varstudent tune)
STUDY_SECTIONS = ("tune",)


@dataclass(frozen=True)
class PipelineParameter:
    name: str  # pipeline parameter name, e.g. distill_kd_weight
    key: str  # params.yaml key, e.g. distill.kd_weight
    type: type  # int, float, bool or str (lists travel as JSON strings)
    default: Any


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, declared type) of every setting of a config dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    out: list[tuple[str, Any]] = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            if key not in BUILD_SECTIONS:
                out += _leaves(hints[f.name], f"{key}.")
        else:
            out.append((key, hints[f.name]))
    return out


def _lookup(params: Params, key: str) -> Any:
    value: Any = params
    for part in key.split("."):
        value = getattr(value, part)
    return value


def pipeline_parameters(params: Params, study: bool = False) -> list[PipelineParameter]:
    """One parameter per setting, defaults from `params` (what params.yaml and --set gave); the `tune`
    settings only with `study` (the tuning pipeline)."""
    result = []
    for key, typ in _leaves(Params):
        if not study and key.split(".")[0] in STUDY_SECTIONS:
            continue
        value = _lookup(params, key)
        if typ in (int, float, bool, str):
            result.append(PipelineParameter(key.replace(".", "_"), key, typ, value))
        else:  # lists: names, [low, high] ranges, sizes
            result.append(PipelineParameter(key.replace(".", "_"), key, str, json.dumps(list(value))))
    names = [p.name for p in result]
    assert len(set(names)) == len(names), "two settings map to the same pipeline parameter name"
    return result


def keys_of_sections(sections: tuple[str, ...]) -> list[str]:
    """The dotted keys of the given sections (`seed` is a section of its own)."""
    return [key for key, _ in _leaves(Params) if key.split(".")[0] in sections]


def settings_lines(params: Params, sections: tuple[str, ...]) -> str:
    """The `section.key=VALUE` lines of the given sections, as `params_from_settings` reads them back."""
    lines = []
    for key in keys_of_sections(sections):
        value = _lookup(params, key)
        lines.append(f"{key}={json.dumps(list(value)) if isinstance(value, tuple) else value}")
    return "\n".join(lines)


def _read_value(key: str, typ: Any, text: str) -> Any:
    if typ is str:
        return text
    if typ is bool:
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        raise ConfigError(f"{key}: expected true or false, got {text!r}")
    if typ in (int, float):
        try:
            number = float(text)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {text!r}") from None
        # protobuf keeps every number as a double: an integer setting may arrive as "100.0"
        return int(number) if typ is int and number.is_integer() else number
    try:  # list settings travel as JSON
        return json.loads(text)
    except json.JSONDecodeError:
        raise ConfigError(f"{key}: expected a JSON list such as [\"compact\"], got {text!r}") from None


def params_from_settings(text: str) -> Params:
    """Validated Params from `section.key=VALUE` lines; sections not mentioned keep their defaults."""
    types = dict(_leaves(Params))
    raw: dict[str, Any] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep or key not in types:
            raise ConfigError(f"pipeline settings: unknown line {line!r}")
        node = raw
        *sections, name = key.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = _read_value(key, types[key], value)
    return _build(Params, raw, "")
