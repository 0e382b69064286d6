"""Load the example scripts under launch/ as modules, for tests."""

import os


def load_example(name):
    """Import launch/<name>.py as a module named <name>_example (launch/mnist1d.py would shadow the
    mnist1d package if its folder were put on sys.path)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "launch", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"{name}_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
