"""The compliance audit trail: a chained, HMAC-signed audit.jsonl per run with a signed head (trail.py), a key
kept outside the run directory (keys.py), a TOML policy checked before workers start (policy.py), the facts
recorded about code, data and environment (provenance.py), the plugin (plugin.py), a reviewer's report
(report.py) and `mpnn audit verify|report` (cli.py)."""

from mpnn.plugins.errors import PluginError


class AuditError(PluginError):
    """A trail, key or policy that cannot be used: the message names the file and what to do."""

    def __init__(self, message: str):
        super().__init__(message, plugin="audit")
