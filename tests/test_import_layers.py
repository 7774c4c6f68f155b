"""Imports in sparsejax flow downwards only: no module imports one of a higher layer, not even
inside a function (DESIGN.md, "Layers, and which way imports go")."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sparsejax"

LAYERS: dict[str, tuple[int, str]] = {
    "errors": (0, "base: the user-error types and their one-line report, for every layer"),
    "host": (0, "base: process settings made before JAX starts, for every entry point"),
    "estimators": (1, "pure jax.numpy math of the gate distributions; knows no module"),
    "user_code": (1, "the user's own modules named on the command line, for every layer"),
    "gates": (2, "NNX gate modules drawing from the estimators"),
    "models": (3, "the zoo, gated through the gates"),
    "structure": (4, "units, params, FLOPs, node rules and reports of a model's declarations"),
    "methods": (5, "gates, losses, optimizers and state of each method, read off the structure"),
    "data": (5, "datasets and batch sources, read by train only; a sibling of methods"),
    "train": (6, "the engine: runs any method through its interface, reads data"),
    "slim": (7, "the slimming tool: rebuilds a trained run with the engine"),
    "plots": (8, "figures from a run's metrics file, which train writes"),
}
"""``top-level name under sparsejax: (rank, reason)``. A module may import modules of its own
layer and of a lower rank; layers of equal rank do not import each other."""

ROOT = "sparsejax"
"""The package itself: rank 0, since importing any of its modules runs its ``__init__``."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return (PACKAGE.parent / relative).is_dir() or (PACKAGE.parent / f"{relative}.py").is_file()


def imported_modules(source: str, module: str, package: bool) -> list[str]:
    """Every ``sparsejax`` module that ``source`` (the text of ``module``) imports, at module
    level or inside a function: ``import sparsejax.x``, ``from sparsejax.x import y`` (``y``
    itself when it is a module) and relative imports, resolved against ``module``."""
    here = module.split(".") if package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append(target)
            found.extend(
                f"{target}.{alias.name}"
                for alias in node.names
                if _is_module(f"{target}.{alias.name}")
            )
    return [name for name in found if name == ROOT or name.startswith(ROOT + ".")]


def layer_of(module: str) -> str:
    """The layer of a ``sparsejax`` module: its top-level name, or :data:`ROOT`."""
    parts = module.split(".")
    if len(parts) == 1:
        return ROOT
    if parts[1] not in LAYERS:
        raise AssertionError(f"{module} is in no layer; add {parts[1]!r} to LAYERS")
    return parts[1]


def rank(layer: str) -> int:
    return 0 if layer == ROOT else LAYERS[layer][0]


def violations(source: str, module: str, package: bool = False) -> list[str]:
    """One message per import of ``module`` that goes up or sideways."""
    importer = layer_of(module)
    messages = []
    for imported in imported_modules(source, module, package):
        target = layer_of(imported)
        if target != importer and rank(target) >= rank(importer):
            messages.append(
                f"{module} (layer {importer}, rank {rank(importer)}) imports {imported} "
                f"(layer {target}, rank {rank(target)})"
            )
    return messages


def package_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_top_level_module_has_a_layer():
    names = {path.relative_to(PACKAGE).parts[0].removesuffix(".py") for path in package_modules()}
    assert names - {"__init__"} == set(LAYERS)


def test_no_module_imports_a_higher_layer():
    messages = []
    for path in package_modules():
        messages += violations(path.read_text(), module_name(path), is_package(path))
    assert not messages, "imports that go up:\n" + "\n".join(messages)


@pytest.mark.parametrize(
    "source, module, package, imported",
    [
        (
            "from sparsejax.train.checkpoint import CHECKPOINT_DIR",
            "sparsejax.methods.warm_start",
            False,
            "sparsejax.train.checkpoint",
        ),
        (
            "def load():\n    import sparsejax.slim.traced as traced\n",
            "sparsejax.structure.report",
            False,
            "sparsejax.slim.traced",
        ),
        ("from sparsejax import train", "sparsejax.methods.greg", True, "sparsejax.train"),
        (
            "from ...train.loop import build",
            "sparsejax.methods.greg.method",
            False,
            "sparsejax.train.loop",
        ),
        ("from sparsejax.methods import METHODS", "sparsejax.data.x", False, "sparsejax.methods"),
        ("from sparsejax.data import load_dataset", "sparsejax.models.x", False, "sparsejax.data"),
    ],
)
def test_the_checker_catches_an_upward_import(source, module, package, imported):
    importer, target = layer_of(module), layer_of(imported)
    assert violations(source, module, package) == [
        f"{module} (layer {importer}, rank {rank(importer)}) imports {imported} "
        f"(layer {target}, rank {rank(target)})"
    ]


@pytest.mark.parametrize(
    "source, module, package",
    [
        ("from sparsejax.models.base import Layer", "sparsejax.structure.accounting", False),
        ("from . import state_paths", "sparsejax.methods.stochastic", False),
        ("from .schedule import FINETUNE", "sparsejax.methods.greg", True),
        ("import numpy as np\nfrom sparsejax.errors import UserError", "sparsejax.data.x", False),
    ],
)
def test_the_checker_allows_downward_and_same_layer_imports(source, module, package):
    assert violations(source, module, package) == []


def test_a_relative_import_resolves_against_its_package():
    module = "sparsejax.methods.greg.report"
    assert imported_modules("from ..accounting import x", module, False) == [
        "sparsejax.methods.accounting"
    ]
    assert imported_modules("from . import report", "sparsejax.methods.greg", True) == [
        "sparsejax.methods.greg",
        "sparsejax.methods.greg.report",
    ]
