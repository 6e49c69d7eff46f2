"""The one config layer: a frozen base section, `ConfigError(problems)`, the problem formatter and
the YAML-plus-`--set` loader that the job config, the sweep config and the serving settings use."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config that cannot run; the message lists every problem, one per line, by key."""

    def __init__(self, problems: list[str], title: str = "invalid config"):
        self.problems = list(problems)
        self.title = title
        super().__init__(f"{title}:\n" + "\n".join(f"  - {p}" for p in self.problems))

    def __reduce__(self):  # survives Ray's trip back to the driver with its problem list intact
        return (type(self), (self.problems, self.title))


class Section(BaseModel):
    """Base of every config section: unknown keys are refused, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def location(loc: tuple) -> str:
    """pydantic's error location as a dotted key (validator-function frames left out)."""
    return ".".join(str(p) for p in loc if not str(p).startswith("function-")) or "<root>"


def problems_of(exc: ValidationError) -> list[str]:
    """Every validation error as `dotted.key: what to fix`."""
    problems = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the documented fields)"
        problems.append(f"{location(err['loc'])}: {msg}")
    return problems


def validate(model: type[M], raw: Any, *, title: str = "invalid config", context: dict | None = None) -> M:
    """dict -> model, or ConfigError listing every problem by key."""
    if not isinstance(raw, dict):
        raise ConfigError(["<root>: the config must be a mapping of sections"], title)
    try:
        return model.model_validate(raw, context=context)
    except ValidationError as exc:
        raise ConfigError(problems_of(exc), title) from None


def set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.get(k)
        if not isinstance(child, dict):
            child = node[k] = {}
        node = child
    node[keys[-1]] = value


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    """`key.sub=value` strings -> (key, YAML-parsed value)."""
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError([f"--set {pair!r}: expected key=value (e.g. optimizer.learning_rate=2e-5)"])
        key, raw = pair.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw)))
    return out


def read_yaml(path: str | Path) -> dict:
    """A YAML file (a local path or a storage URI) whose top level is a mapping, or ConfigError naming the file."""
    from rayembed import storage

    text = None
    if storage.is_uri(path):
        try:
            text = storage.read_text(str(path))
        except (OSError, FileNotFoundError):
            pass
    else:
        path = Path(path)
        text = path.read_text() if path.is_file() else None
    if text is None:
        raise ConfigError([f"{path}: no such file"])
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML ({exc})"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: expected a YAML mapping at the top level"])
    return raw


def load(model: type[M], path: str | Path | None, overrides: list[str] | None = None, *,
         prepare: Callable[[dict, Path | None], dict] | None = None, title: str = "invalid config",
         context: dict | None = None) -> M:
    """Read YAML (optional), let `prepare` rewrite the raw tree, apply `--set` overrides, validate."""
    raw = read_yaml(path) if path is not None else {}
    if prepare is not None:
        raw = prepare(raw, Path(path) if path is not None and "://" not in str(path) else None)
    for key, value in parse_overrides(overrides or []):
        set_path(raw, key, value)
    return validate(model, raw, title=title, context=context)


def dump(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def field_help(model: type[BaseModel], prefix: str = "") -> list[str]:
    """`key: type = default  description` for every field, nested sections flattened (the CLI's --help)."""
    lines = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.extend(field_help(annotation, key + "."))
            continue
        for arg in getattr(annotation, "__args__", ()):  # Optional[Section]
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                lines.extend(field_help(arg, key + "."))
                break
        else:
            default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
            lines.append(f"  {key} ({default}): {field.description or ''}".rstrip(": "))
    return lines



def _section_of(annotation) -> type[BaseModel] | None:
    """The config section class a field holds (`Mining | None` -> Mining), if any."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_of(arg)
        if found is not None:
            return found
    return None


def places(cls: type[BaseModel], raw: Any, prefix: str = "") -> list[tuple[str, str, Any]]:
    """Every field marked as a place (`json_schema_extra={"place": kind}`: read, write or model) that the raw input
    `raw` (a dict, before validation) sets to a non-null value other than one of the field's `names` (values that
    name a packaged thing, not a place), in `cls` and its sections: (dotted key, kind, value)."""
    if not isinstance(raw, dict):
        return []
    out: list[tuple[str, str, Any]] = []
    for name, field in cls.model_fields.items():
        if name not in raw or raw[name] is None:
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if "place" in extra:
            if raw[name] not in extra.get("names", ()):  # a name the field also takes (a shipped set) is no place
                out.append((prefix + name, extra["place"], raw[name]))
        elif (section := _section_of(field.annotation)) is not None:
            out += places(section, raw[name], f"{prefix}{name}.")
    return out


def place_fields(cls: type[BaseModel], prefix: str = "") -> dict[str, str]:
    """Every place field `cls` declares (dotted key -> kind), for the structure test and the docs."""
    out: dict[str, str] = {}
    for name, field in cls.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if "place" in extra:
            out[prefix + name] = extra["place"]
        elif (section := _section_of(field.annotation)) is not None:
            out.update(place_fields(section, f"{prefix}{name}."))
    return out
