"""Imports only go down the stack (issue 11; docs/architecture.md "Layers": core <- nn, optim <- parallel <- launch;
comm knows nothing of core). Every module under mpnn/ is parsed with `ast`, imports inside functions and under
TYPE_CHECKING included, and each import of an mpnn module is checked against LAYERS: a unit may import itself and
the units of strictly lower layers, never a unit of its own layer or above. No mpnn module is imported, so this
runs in a second and cannot be fooled by import order.

A unit is a subpackage (mpnn/core/ -> "core") or a top-level module (mpnn/runtime.py -> "runtime"); mpnn/__init__.py
and mpnn/__main__.py are the unit "mpnn", the top (importing it, e.g. `import mpnn` or `from mpnn import
__version__`, imports everything). A new subpackage or top-level module fails test_every_unit_has_a_layer until it
is given a place here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mpnn"

LAYERS: list[tuple[str, ...]] = [
    # 0. Leaves: import nothing from mpnn, so that any layer may use them.
    (
        "_version",  # the one version string (pyproject.toml reads it too)
        "hooks",  # the engine's events (backward pre/post, queued callbacks) that the layers above subscribe to
        "safefs",  # files and directories another local user could prepare: O_EXCL, O_NOFOLLOW, ownership checks
        "threads",  # one BLAS/Numba thread per rank; runs before NumPy loads
        "worldspec",
    ),  # the one parse of rank, world size and rendezvous from the environment
    # 1. The engine and the transport, side by side: comm moves NumPy buffers and knows nothing of core, and core
    #    nothing of comm.
    ("core", "comm"),
    # 2. Built on the engine: layers and losses; optimizers.
    ("nn", "optim"),
    # 3. Per-worker telemetry: instrument subscribes to backward and optimizer steps; readers, summary, trace, plots.
    ("telemetry",),
    # 4. Datasets and loaders: tensors from core, the DataLoader's fetch time to telemetry. The op profiler: times
    #    ops through core's switch (mpnn.core.optrace), names its trace files as telemetry reads them. mpnn.compile's
    #    capture and replay (records core's ops, calls optimizer steps and zero_grad, counts into telemetry).
    ("data", "profiler", "capture"),
    # 5. Plugins see buffers and step records: codecs all-reduce through comm; the session listens to optimizer
    #    steps, the sampler's epochs and saves, and records through telemetry.
    ("plugins",),
    # 6. DataParallel (nn modules, comm, codecs, telemetry); the process runtime behind mpnn.init()/get_comm().
    ("parallel", "runtime"),
    # 7. Checkpoints of a DataParallel run (model weights in safetensors); ONNX export of nn models (traces a forward).
    ("checkpoint", "onnx"),
    # 8. The launcher: spawns, pins and watches workers, warms every layer's kernels, resumes from checkpoints.
    ("launch",),
    # 9-11. Commands on top of the launcher.
    ("bench",),
    ("bench_cli",),
    ("cli",),
    # 12. The package's public surface (mpnn/__init__.py) and `python -m mpnn`.
    ("mpnn",),
    # 13. mpnn.compat: the torch alias forwards `torch.<name>` to the public surface; imported only by its users.
    ("compat",),
]
LAYER = {unit: level for level, units in enumerate(LAYERS) for unit in units}

# Known violations, each named, with its reason and owner: "path:importing unit -> imported unit". An entry here is
# a debt, not a permission; test_allowlist_is_not_stale fails once it is paid, so that it is removed.
ALLOWED: dict[str, str] = {}


def unit_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return "mpnn" if parts in (("__init__",), ("__main__",)) else parts[0]


def module_of(path: Path) -> tuple[str, bool]:
    """The dotted module name of a file, and whether it is a package (__init__.py)."""
    parts = ("mpnn",) + path.relative_to(PACKAGE).with_suffix("").parts
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def target_unit(dotted: str) -> str:
    """The unit an absolute import of `dotted` (an mpnn module or a name in one) lands in."""
    parts = dotted.split(".")
    if len(parts) == 1:
        return "mpnn"
    head = parts[1]
    return head if (PACKAGE / head).is_dir() or (PACKAGE / f"{head}.py").is_file() else "mpnn"


def mpnn_imports(path: Path, text: str | None = None):
    """(line, imported dotted name) for every import in `path` (or in `text`, as if it were at `path`), at any
    depth, relative imports resolved."""
    module, is_package = module_of(path)
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text() if text is None else text, str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:  # `from mpnn import nn` imports mpnn.nn; `from mpnn import x` the package
                yield node.lineno, f"{source}.{alias.name}" if source == "mpnn" else source


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def violations() -> dict[str, str]:
    """'path:line: importer -> imported (dotted)' keyed by 'path:importer -> imported unit'."""
    found: dict[str, str] = {}
    for path in modules():
        unit = unit_of(path)
        for line, dotted in mpnn_imports(path):
            if dotted != "mpnn" and not dotted.startswith("mpnn."):
                continue
            target = target_unit(dotted)
            if target == unit or LAYER.get(target, -1) < LAYER.get(unit, -1):
                continue
            rel = path.relative_to(PACKAGE.parent).as_posix()
            key = f"{rel}:{unit} -> {target}"
            found.setdefault(key, "")
            found[key] += (
                f"\n  {rel}:{line}: {unit} (layer {LAYER.get(unit)}) imports {dotted} "
                f"({target}, layer {LAYER.get(target)})"
            )
    return found


def test_every_unit_has_a_layer():
    units = {unit_of(path) for path in modules()}
    assert units - set(LAYER) == set(), "give these subpackages/modules a layer in LAYERS"
    assert set(LAYER) - units == set(), "LAYERS names units that no longer exist"
    assert len(LAYER) == sum(map(len, LAYERS)), "a unit is in two layers"


def test_table_keeps_design_arrows():
    """docs/architecture.md's arrows, as the table must keep them."""
    assert LAYER["core"] < LAYER["nn"] < LAYER["parallel"] < LAYER["launch"]
    assert LAYER["core"] < LAYER["optim"] < LAYER["parallel"]
    assert LAYER["core"] < LAYER["data"]
    assert LAYER["comm"] < LAYER["parallel"]
    assert LAYER["comm"] == LAYER["core"]  # side by side: neither may import the other
    # comm knows nothing of the engine or anything built on it
    for unit in ("core", "nn", "optim", "data", "parallel", "launch", "telemetry", "plugins", "mpnn"):
        assert LAYER[unit] >= LAYER["comm"], unit
    for unit in ("_version", "hooks", "threads", "worldspec"):
        assert LAYER[unit] == 0


def test_leaves_import_nothing_from_mpnn():
    for unit in LAYERS[0]:
        path = PACKAGE / f"{unit}.py"
        assert [d for _, d in mpnn_imports(path) if d == "mpnn" or d.startswith("mpnn.")] == [], path


def test_imports_go_down_the_stack():
    found = violations()
    new = {key: lines for key, lines in found.items() if key not in ALLOWED}
    assert not new, (
        "imports up (or across) the stack; move the code to the layer that may import both, or "
        "subscribe through mpnn.hooks:" + "".join(new.values())
    )


def test_allowlist_is_not_stale():
    stale = set(ALLOWED) - set(violations())
    assert not stale, f"these ALLOWED entries are fixed: remove them: {sorted(stale)}"


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from mpnn.optim import SGD", "optim"),
        ("import mpnn.core.tensor", "core"),
        ("from mpnn import nn", "nn"),
        ("from mpnn import __version__", "mpnn"),
        ("import mpnn", "mpnn"),
        ("from ..optim import SGD", "optim"),
        ("from . import ops", "core"),
    ],
)
def test_import_resolution(source, expected):
    """The checker's own resolution, for a function-level import in a module at mpnn/core/x.py."""
    (dotted,) = [d for _, d in mpnn_imports(PACKAGE / "core" / "x.py", f"def f():\n    {source}\n")]
    assert target_unit(dotted) == expected
