"""Reading a run's config: YAML files plus ``dotted.key=value`` overrides, into the
frozen dataclasses of ``ptjax.config.schema``, checked by ``ptjax.config.checks``.

    cfg = load_config("experiments/demo.yaml", ["train.steps=200", "prompt.length=20"])
    cfg.prompt.length, cfg.optim.learning_rate, ...

An unknown key is a one-line error naming the closest valid key; a bad value names the
key and what is valid.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from typing import Any

import yaml

from ptjax.config.checks import validate
from ptjax.config.schema import LabelWords, RunConfig
from ptjax import storage
from ptjax.errors import PtjaxError


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. (YAML 1.1 also reads yes/no/on/off as
    booleans, which would turn labels such as [no, yes] into [False, True].)"""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"))


def parse_yaml(text):
    """YAML (a string or file) read with YAML 1.2 booleans (``_Loader``)."""
    return yaml.load(text, Loader=_Loader)


def fields_of(cls) -> dict[str, Any]:
    """{field name: its type} of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def all_keys(cls=RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of a config class, e.g. 'optim.learning_rate'."""
    keys = []
    for name, typ in fields_of(cls).items():
        if dataclasses.is_dataclass(typ):
            keys += all_keys(typ, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def unknown_key(key: str, where: str) -> PtjaxError:
    """The one-line error for an unknown key, naming the closest valid one."""
    keys = all_keys()
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close:  # compare the last part alone: "lr" is far from "optim.learning_rate"
        tails = {k.rsplit(".", 1)[-1]: k for k in keys}
        close = [tails[t] for t in difflib.get_close_matches(key.rsplit(".", 1)[-1], tails,
                                                              n=1, cutoff=0.5)]
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(keys)}"
    return PtjaxError(f"{where}: unknown config key {key!r}{hint}")


def _coerce(key: str, typ, value, where: str):
    """``value`` (from YAML or an override) as the field's type, or a one-line error."""
    def bad(expected):
        return PtjaxError(f"{where}: {key}={value!r} is not {expected}")

    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad("a boolean (true / false)")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise bad("an integer")
        try:
            return int(value)
        except ValueError:
            raise bad("an integer") from None
    if typ is float:
        if isinstance(value, bool):
            raise bad("a number")
        try:  # PyYAML reads "1e-5" (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            raise bad("a number") from None
    if typ is str:
        if value is None:
            return ""
        if key == "task.mixture_rates" and isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)  # [2, 1, 0] in YAML
        if isinstance(value, (dict, list)):
            raise bad("a string")
        return str(value)
    if typ == LabelWords:
        if value is None or value == "" or value == ():
            return ()
        items = value.items() if isinstance(value, dict) else value
        try:
            pairs = [(str(c), words) for c, words in items]
        except (TypeError, ValueError):
            raise bad("a mapping of classes to label words, e.g. {negative: [bad], "
                      "positive: [good, great]}") from None
        out = []
        for c, words in pairs:
            words = [words] if isinstance(words, str) else words
            if not isinstance(words, (list, tuple)) or not words or \
                    not all(isinstance(w, str) and w.strip() for w in words):
                raise bad(f"a mapping of classes to label words; class {c!r} needs a "
                          "non-empty list of words")
            out.append((c, tuple(words)))
        return tuple(out)
    if dataclasses.is_dataclass(typ):  # an entry of a list of sections (task.mixture)
        if isinstance(value, typ):
            return value
        if not isinstance(value, dict):
            raise bad(f"a list of mappings ({', '.join(fields_of(typ))})")
        return _build(typ, value, f"{key}.", where)
    if typing.get_origin(typ) is tuple:
        (inner, _) = typing.get_args(typ)
        if value is None or value == "":
            return ()
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_coerce(key, inner, v, where) for v in value)
    raise AssertionError(f"unhandled config type {typ}")


def _build(cls, data: dict, prefix: str, where: str):
    fields = fields_of(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            while isinstance(value, dict) and value:  # name the whole key: a.b.c, not a.b
                name, value = next(iter(value.items()))
                key = f"{key}.{name}"
            raise unknown_key(key, where)
        typ = fields[name]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise PtjaxError(f"{where}: {key!r} is a section; give it as a mapping of "
                                 f"keys ({', '.join(fields_of(typ))})")
            kwargs[name] = _build(typ, value, f"{key}.", where)
        else:
            kwargs[name] = _coerce(key, typ, value, where)
    return cls(**kwargs)


def _set_dotted(data: dict, key: str, value, where: str):
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise unknown_key(key, where)
        node = child
    node[parts[-1]] = value


def from_dict(data: dict, overrides=(), where: str = "config") -> RunConfig:
    """A validated ``RunConfig`` from a nested dict and ``dotted.key=value`` strings."""
    data = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise PtjaxError(f"override {item!r} must look like dotted.key=value "
                             "(e.g. train.steps=100)")
        key, raw = item.split("=", 1)
        key = current_key(key.strip())
        typ = _field_type(key)
        if typ is None:  # named as the override's, not the config file's, mistake
            raise unknown_key(key, f"override {item!r}")
        if typ is str:  # a string is taken as given: "{inputs} {soft:3}"
            value = raw[1:-1] if len(raw) > 1 and raw[0] == raw[-1] and raw[0] in "'\"" \
                else raw
        else:
            try:
                value = parse_yaml(raw) if raw.strip() else ""
            except yaml.YAMLError as e:
                raise PtjaxError(f"override {item!r}: the value is not valid YAML "
                                 f"({str(e).splitlines()[0]})") from None
            if not dataclasses.is_dataclass(typ):  # a wrong type, too, is the override's
                _coerce(key, typ, value, f"override {item!r}")
            elif not isinstance(value, dict):
                raise PtjaxError(f"override {item!r}: {key!r} is a section; give one of its "
                                 f"keys ({key}.KEY=value) or a mapping")
        _set_dotted(data, key, value, "override")
    _moved_method(data, where)
    return validate(_build(RunConfig, data, "", where), where)


# Keys that were renamed: read under their new name (config files, overrides, sweep axes).
RENAMED = {"train.method": "method.name"}


def current_key(key: str) -> str:
    return RENAMED.get(key, key)


def _field_type(key: str):
    """The type of a dotted config key, or None for an unknown key."""
    cls = RunConfig
    for part in key.split("."):
        fields = fields_of(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            return None
        cls = fields[part]
    return cls


def _moved_method(data: dict, where: str):
    """``train.method`` (before the methods seam) is read as ``method.name``."""
    train = data.get("train")
    if not isinstance(train, dict) or "method" not in train:
        return
    old = train.pop("method")
    method = data.setdefault("method", {})
    if not isinstance(method, dict):
        return
    if "name" in method and method["name"] != old:
        raise PtjaxError(f"{where}: train.method={old!r} and method.name={method['name']!r} "
                         "disagree; train.method is the old name of method.name, give only "
                         "method.name")
    method["name"] = old


def _deepcopy(d):
    return {k: _deepcopy(v) if isinstance(v, dict) else v for k, v in d.items()}


def load_config(path: str | None, overrides=()) -> RunConfig:
    """Read a YAML config (``None`` = all defaults) and apply overrides."""
    data = {}
    if path is not None:
        if not storage.exists(path):
            raise PtjaxError(f"{path}: config file not found")
        if storage.isdir(path):
            raise PtjaxError(f"{path}: is a directory, not a config file (a run directory "
                             "holds config.yaml)")
        try:
            data = parse_yaml(storage.read_text(path))
        except yaml.YAMLError as e:
            raise PtjaxError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        except UnicodeDecodeError as e:
            raise PtjaxError(f"{path}: not UTF-8 text (byte {e.start})") from None
        except OSError as e:
            raise PtjaxError(f"{path}: cannot be read ({e.strerror})") from None
        if data is None:  # a run on all defaults is 30,000 steps: never by accident
            raise PtjaxError(f"{path}: the config file is empty; give at least one section "
                             "(e.g. train: {steps: 100}), or no file for the defaults")
        if not isinstance(data, dict):
            raise PtjaxError(f"{path}: must hold a mapping of config sections")
    return from_dict(data, overrides, where=path or "config")


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples as lists), ready for YAML / JSON."""
    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(dataclasses.asdict(cfg))


def save_config(cfg: RunConfig, path: str):
    """Atomic: a run killed while writing leaves the old file or the new one, never half
    (a local path or a URL: ``ptjax.storage``)."""
    storage.write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
