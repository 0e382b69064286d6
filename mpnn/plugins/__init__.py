"""mpnn.plugins: extend a run without forking mpnn. A plugin is a plain class with ``name``, ``version``,
``options`` (name -> Option) and a docstring, implementing any hook of hookspec.py marked ``@hookimpl``;
or a gradient codec (codec.py), the one stateful slot that replaces DataParallel's mean all-reduce.

Plugins are named on the command line (``mpnn launch --plugin topk:ratio=0.01 --plugin mypkg.mod:MyPlugin``),
found through the ``mpnn.plugins`` entry point group, or passed in code (``mpnn.init(plugins=[obj])``);
``mpnn plugins list`` shows every plugin found with its options. A minimal plugin::

    from mpnn.plugins import Option, hookimpl

    class LossPrinter:
        \"\"\"Print the loss every `every` steps.\"\"\"
        name, version = "lossprinter", "1.0"
        options = {"every": Option(int, 100, "steps between prints")}

        def __init__(self, every=100):
            self.every = every

        @hookimpl
        def mpnn_step_end(self, run, record):
            if record["step"] % self.every == 0:
                print(run.rank, record["step"], record["loss"])
"""

from mpnn.plugins.codec import BucketContext, Codec
from mpnn.plugins.errors import PluginError, PluginRefusal
from mpnn.plugins.hookspec import hookimpl
from mpnn.plugins.info import LaunchInfo, RunInfo
from mpnn.plugins.options import Option

__all__ = ["hookimpl", "Option", "Codec", "BucketContext", "LaunchInfo", "RunInfo", "PluginError", "PluginRefusal"]
