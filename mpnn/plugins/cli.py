"""`mpnn plugins list`: every plugin found (built-in and `mpnn.plugins` entry points), its version, where it
comes from, its one line of help and its options (type, default, help); one that cannot load says why."""

from __future__ import annotations

import json

import click

from mpnn.plugins.registry import catalog, check_plugin_class, type_name


def describe(entry) -> dict:
    """One catalog entry as a dict: name, source, and version/help/kind/options, or the error loading it."""
    info = {"name": entry.name, "source": entry.source}
    try:
        cls = entry.load()
        check_plugin_class(cls, entry.name)
    except Exception as error:
        return {**info, "error": f"{type(error).__name__}: {error}"}
    return {
        **info,
        "version": cls.version,
        "kind": getattr(cls, "kind", "observer"),
        "help": cls.__doc__.strip().splitlines()[0],
        "options": [
            {"name": key, "type": type_name(o.type), "default": o.default, "help": o.help}
            for key, o in cls.options.items()
        ],
    }


@click.group("plugins")
def plugins():
    """Find and inspect plugins (--plugin NAME[:key=value,...] on `mpnn launch`)."""


@plugins.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the list as one JSON document.")
def list_plugins(as_json: bool):
    """Every plugin found, with its version, options and one line of help."""
    found = [describe(entry) for entry in catalog()]
    if as_json:
        click.echo(json.dumps(found, indent=2, default=str))
        return
    for info in found:
        if "error" in info:
            click.echo(f"{info['name']}  ({info['source']})  cannot be loaded: {info['error']}\n")
            continue
        click.echo(f"{info['name']} {info['version']}  ({info['source']}, {info['kind']})  {info['help']}")
        for option in info["options"]:
            click.echo(f"    {option['name']}=<{option['type']}>  default {option['default']!r}  {option['help']}")
        if not info["options"]:
            click.echo("    (no options)")
        click.echo("")
