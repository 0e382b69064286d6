"""Finding plugins and reading spec strings: built-in names, the `mpnn.plugins` entry point group, and
``package.module:Class`` paths; ``name[:key=value,...]`` options checked against the plugin's declared
Options and converted to their types, with messages that list what would be accepted.

Resolving a spec imports the plugin's module (built-ins lazily: a built-in whose module is missing fails only
when a run names it) but does not build the plugin; ``Resolved.create()`` does.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mpnn.plugins.errors import PluginError
from mpnn.plugins.options import Option

ENTRY_POINT_GROUP = "mpnn.plugins"
BUILTINS = {
    "fp16": "mpnn.plugins.compression.fp16:FP16",
    "topk": "mpnn.plugins.compression.topk:TopK",
    "powersgd": "mpnn.plugins.compression.powersgd:PowerSGD",
    "signsgd": "mpnn.plugins.compression.signsgd:SignSGD",
    "watchdog": "mpnn.plugins.watchdog:Watchdog",
    "audit": "mpnn.plugins.audit.plugin:AuditTrail",
    "tensorboard": "mpnn.plugins.tensorboard:TensorBoard",
}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class Spec:
    """A parsed spec string: ``target`` is a plugin name or ``package.module:Class``; options stay text."""

    text: str
    target: str
    options: tuple  # ((key, raw value), ...) in the order given


@dataclass(frozen=True)
class Resolved:
    """A plugin class found for a spec, with its options checked and converted: ready to build."""

    spec: str
    name: str
    cls: type
    options: dict
    source: str  # "built-in", "entry point <value> (<dist> <version>)" or the import path

    def create(self) -> Any:
        """Build the plugin object; an exception from its constructor becomes a PluginError naming it."""
        try:
            return self.cls(**self.options)
        except Exception as error:
            raise PluginError(
                f"--plugin {self.spec!r}: {self.name} refused its options: {type(error).__name__}: {error}",
                plugin=self.name,
            ) from error


@dataclass(frozen=True)
class CatalogEntry:
    """One plugin `mpnn plugins list` shows: its name, where it comes from, and how to load its class."""

    name: str
    source: str
    load: Callable[[], type]


def parse_spec(text: str) -> Spec:
    """Split ``name[:key=value,...]`` or ``package.module:Class[:key=value,...]``.

    The part after the first ':' is a class name when it is a plain identifier and the head is a dotted module
    path (or not a known plugin name); otherwise it is the options. Values may hold ':' and '=' but not ','.
    """
    text = text.strip()
    head, _, rest = text.partition(":")
    if not head:
        raise PluginError(
            f"--plugin {text!r}: empty plugin name; give name[:key=value,...] or "
            f"package.module:Class[:key=value,...] (built-in plugins: {', '.join(sorted(BUILTINS))})"
        )
    target, options_text = head, rest
    first, _, after = rest.partition(":")
    if first.isidentifier() and ("." in head or head not in known_names()):
        target, options_text = f"{head}:{first}", after
    options = []
    for item in filter(None, (part.strip() for part in options_text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise PluginError(f"--plugin {text!r}: option {item!r} is not key=value")
        if any(key.strip() == seen for seen, _ in options):
            raise PluginError(f"--plugin {text!r}: option {key.strip()!r} is given twice")
        options.append((key.strip(), value.strip()))
    return Spec(text, target, tuple(options))


def known_names() -> list[str]:
    """Every plugin name a spec may use: the built-ins and the entry points, sorted."""
    return sorted(set(BUILTINS) | {ep.name for ep in _entry_points()})


def resolve(text: str) -> Resolved:
    """Find the plugin a spec names and convert its options; PluginError (listing what is accepted) if not."""
    spec = parse_spec(text)
    cls, source = _find(spec)
    check_plugin_class(cls, spec.text)
    return Resolved(spec.text, cls.name, cls, convert_options(cls, spec), source)


def resolve_all(specs) -> list[Resolved]:
    """Resolve every spec of one run; refuse a plugin named twice and more than one gradient codec."""
    resolved = [resolve(text) for text in specs]
    check_one_of_each([(r.name, r.cls) for r in resolved])
    return resolved


def check_one_of_each(named) -> None:
    """Refuse a run whose plugins (name, class or object) repeat a name or hold more than one codec."""
    names = [name for name, _ in named]
    for name in names:
        if names.count(name) > 1:
            raise PluginError(f"plugin {name!r} is named twice; name each plugin once", plugin=name)
    codecs = [name for name, plugin in named if getattr(plugin, "kind", None) == "codec"]
    if len(codecs) > 1:
        raise PluginError(
            f"two gradient codecs named ({', '.join(map(repr, codecs))}): a run has one codec slot "
            "(like a DDP communication hook); keep one",
            plugin=codecs[1],
        )


def check_plugin_class(cls: Any, spec: str) -> None:
    """A plugin class must carry name, version, a docstring and options (name -> Option)."""
    label = getattr(cls, "__qualname__", repr(cls))
    if not isinstance(cls, type):
        raise PluginError(f"--plugin {spec!r}: {label} is not a class")
    lacks = [attr for attr in ("name", "version") if not isinstance(getattr(cls, attr, None), str)]
    if not (cls.__doc__ or "").strip():
        lacks.append("a docstring (its first line is the help)")
    if lacks:
        raise PluginError(f"--plugin {spec!r}: {label} is not an mpnn plugin: it lacks {', '.join(lacks)}")
    options = getattr(cls, "options", {})
    if not isinstance(options, dict) or not all(isinstance(o, Option) for o in options.values()):
        raise PluginError(
            f"--plugin {spec!r}: {cls.name}.options must map option names to Option(type, default, help)",
            plugin=cls.name,
        )


def convert_options(cls: type, spec: Spec) -> dict:
    """The spec's options as the types the plugin declares; unknown keys and bad values list what is accepted."""
    declared: dict = getattr(cls, "options", {})
    values = {}
    for key, raw in spec.options:
        if key not in declared:
            close = difflib.get_close_matches(key, list(declared), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PluginError(
                f"--plugin {spec.text!r}: {cls.name} has no option {key!r}{hint}; {describe_options(cls)}",
                plugin=cls.name,
            )
        try:
            values[key] = convert_value(declared[key].type, raw)
        except ValueError as error:
            raise PluginError(
                f"--plugin {spec.text!r}: option {key}={raw!r} of {cls.name} {error}; {describe_options(cls)}",
                plugin=cls.name,
            ) from None
    return values


def convert_value(kind: Any, raw: str) -> Any:
    """Turn option text into `kind` (int, float, str, bool, or a tuple of allowed strings); ValueError if not."""
    if isinstance(kind, tuple):
        if raw not in kind:
            raise ValueError(f"must be one of {', '.join(map(repr, kind))}")
        return raw
    if kind is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ValueError(f"must be a bool ({'/'.join(_TRUE)} or {'/'.join(_FALSE)})")
    if kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            raise ValueError(f"must be {'an int' if kind is int else 'a float'}") from None
    if kind is str:
        return raw
    raise ValueError(f"has an unsupported declared type {kind!r}")


def type_name(kind: Any) -> str:
    """How an option's type reads in messages and `mpnn plugins list`."""
    return "|".join(kind) if isinstance(kind, tuple) else getattr(kind, "__name__", str(kind))


def describe_options(cls: type) -> str:
    """'accepted options: key=<type> (default d), ...' or that the plugin takes none."""
    declared = getattr(cls, "options", {})
    if not declared:
        return f"{cls.name} takes no options"
    return "accepted options: " + ", ".join(
        f"{key}=<{type_name(o.type)}> (default {o.default!r})" for key, o in declared.items()
    )


def catalog() -> list[CatalogEntry]:
    """Every plugin found: the built-ins, then the entry points (an entry point cannot shadow a built-in)."""
    entries = [CatalogEntry(name, "built-in", lambda path=path: _load_path(path)) for name, path in BUILTINS.items()]
    for ep in sorted(_entry_points(), key=lambda ep: ep.name):
        if ep.name not in BUILTINS:
            entries.append(CatalogEntry(ep.name, _ep_source(ep), ep.load))
    return entries


def _find(spec: Spec) -> tuple[type, str]:
    if ":" in spec.target:
        return _load(spec.target, spec.text), spec.target
    if spec.target in BUILTINS:
        return _load(BUILTINS[spec.target], spec.text, name=spec.target), "built-in"
    for ep in _entry_points():
        if ep.name == spec.target:
            try:
                return ep.load(), _ep_source(ep)
            except Exception as error:
                raise PluginError(
                    f"--plugin {spec.text!r}: entry point {ep.value} cannot be loaded: {type(error).__name__}: {error}",
                    plugin=spec.target,
                ) from error
    names = known_names()
    close = difflib.get_close_matches(spec.target, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise PluginError(
        f"--plugin {spec.text!r}: no plugin named {spec.target!r}{hint}; known plugins: "
        f"{', '.join(names)}; or give package.module:Class"
    )


def _load(path: str, spec: str, name: str | None = None) -> type:
    try:
        return _load_path(path)
    except Exception as error:
        what = f"{name} ({path})" if name else path
        raise PluginError(
            f"--plugin {spec!r}: {what} cannot be loaded: {type(error).__name__}: {error}", plugin=name
        ) from error


def _load_path(path: str) -> type:
    module_name, _, attr = path.partition(":")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise AttributeError(f"module {module_name!r} has no attribute {attr!r}") from None


def _entry_points():
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


def _ep_source(ep) -> str:
    dist = getattr(ep, "dist", None)
    return f"entry point {ep.value}" + (f" ({dist.name} {dist.version})" if dist is not None else "")
