"""This process's plugins on a pluggy PluginManager: registered in the order a run names them, checked against
hookspec.py, and wrapped so that a hook that raises fails with a PluginError naming the plugin and the hook."""

from __future__ import annotations

from typing import Any

import pluggy

from mpnn.plugins import hookspec
from mpnn.plugins.errors import PluginError, PluginRefusal
from mpnn.plugins.registry import check_one_of_each

HOOK_PREFIX = "mpnn_"


class PluginManager:
    """The plugins of one launcher or worker. ``hook.<name>(...)`` calls every implementation (pluggy's
    order); ``codec`` is the run's gradient codec or None; ``implements(name)`` tells whether any plugin
    implements a hook, so callers skip work nobody listens to."""

    def __init__(self, plugins=()):
        self._pm = pluggy.PluginManager(hookspec.PROJECT)
        self._pm.add_hookspecs(hookspec)
        self.plugins: list[tuple[str, Any]] = []
        for plugin in plugins:
            self.register(plugin)

    @property
    def hook(self):
        """pluggy's hook relay: ``manager.hook.mpnn_step_end(run=..., record=...)``."""
        return self._pm.hook

    @property
    def codec(self):
        """The one plugin of kind "codec", or None."""
        return next((p for _, p in self.plugins if getattr(p, "kind", None) == "codec"), None)

    def implements(self, hook_name: str) -> bool:
        """True when at least one registered plugin implements `hook_name`."""
        caller = getattr(self._pm.hook, hook_name, None)
        return caller is not None and bool(caller.get_hookimpls())

    def register(self, plugin: Any) -> str:
        """Add a plugin object; refuses a repeated name, a second codec, an unmarked or unknown hook method."""
        name = getattr(plugin, "name", None) or type(plugin).__name__
        check_one_of_each(self.plugins + [(name, plugin)])
        unmarked = [
            attr
            for attr in dir(plugin)
            if attr.startswith(HOOK_PREFIX)
            and callable(getattr(plugin, attr))
            and not hasattr(getattr(plugin, attr), f"{hookspec.PROJECT}_impl")
        ]
        if unmarked:
            raise PluginError(
                f"plugin {name!r}: method {unmarked[0]} is not marked @hookimpl "
                "(from mpnn.plugins import hookimpl), so it would never be called",
                plugin=name,
            )
        try:
            self._pm.register(plugin, name=name)
            self._pm.check_pending()
        except (ValueError, pluggy.PluginValidationError) as error:
            if self._pm.is_registered(plugin):
                self._pm.unregister(plugin)
            reason = " ".join(str(error).split())  # pluggy's message spans lines: one line here
            raise PluginError(
                f"plugin {name!r} cannot be registered: {reason}; the hooks are declared in mpnn/plugins/hookspec.py",
                plugin=name,
            ) from None
        for caller in self._pm.get_hookcallers(plugin) or ():
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and not (impl.wrapper or impl.hookwrapper):
                    impl.function = _naming_errors(impl.function, name, caller.name)
        self.plugins.append((name, plugin))
        return name


def _naming_errors(function, plugin_name: str, hook_name: str):
    """`function` with its exceptions re-raised as PluginError (PluginRefusal kept) naming the plugin."""

    def call(*args):
        try:
            return function(*args)
        except PluginRefusal as error:
            if error.plugin is not None:
                raise
            raise PluginRefusal(f"plugin {plugin_name!r} refused the run: {error}", plugin=plugin_name) from error
        except PluginError as error:
            if error.plugin is not None:
                raise
            raise PluginError(f"plugin {plugin_name!r} failed in {hook_name}: {error}", plugin=plugin_name) from error
        except Exception as error:
            raise PluginError(
                f"plugin {plugin_name!r} failed in {hook_name}: {type(error).__name__}: {error}", plugin=plugin_name
            ) from error

    return call
