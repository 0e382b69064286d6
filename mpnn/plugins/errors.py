"""Errors of the plugin layer; each names the plugin."""


class PluginError(Exception):
    """A bad plugin spec, option or value, or a plugin that raised: the message names the plugin.

    ``plugin`` is the name of the plugin the error is about (None while a spec is too broken to name one)."""

    def __init__(self, message: str, plugin: str | None = None):
        super().__init__(message)
        self.plugin = plugin


class PluginRefusal(PluginError):
    """Raised by a launcher-side hook to refuse a run before any worker starts (e.g. a policy violation)."""
