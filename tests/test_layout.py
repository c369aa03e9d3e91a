"""The house plan (issue 26), checked on every run: imports only go down the layers, no import cycles, few
modules at the top of ``gpt2lab/``, none too long to read in one sitting. Every import counts, those inside
functions and under ``TYPE_CHECKING`` included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gpt2lab"
# Lowest first. A module may import its own layer and the layers below; bench is imported by nothing outside it.
LAYERS = [
    ("foundations", ["errors", "console", "hub", "secrets", "hydra_internals"]),
    ("model, data, tokenizers", ["model", "data", "tokenizers"]),
    ("config, checkpoints, Hugging Face", ["config", "checkpoint", "hf"]),
    ("lit", ["lit"]),
    (
        "library verbs",
        [
            "train",
            "evaluate",
            "harness",
            "serve",
            "inference",
            "exporters",
            "checkup",
            "runs",
            "presets",
            "wizard",
            "sweep",
        ]
        + ["generate", "chat", "export", "check"],  # the old names' packages: aliases of inference/exporters
    ),
    ("benchmarks", ["bench"]),
    ("commands", ["cli", "__main__", "__init__", "reference_loop"]),  # reference_loop: an old name's Error line
]
MAX_TOP_LEVEL_MODULES = 8
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> int:
    """A module's layer: by its name's last part for a command (``<verb>.__main__``), else by its first part."""
    parts = module.split(".")
    key = "__main__" if parts[-1] == "__main__" else ("__init__" if len(parts) == 1 else parts[1])
    return next(i for i, (_, names) in enumerate(LAYERS) if key in names)


def imports(module: str) -> set[str]:
    """The gpt2lab modules ``module`` imports, wherever in the file the import stands."""
    path = MODULES[module]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


GRAPH = {module: imports(module) for module in MODULES}


def test_every_module_has_a_layer():
    """A new package must be placed in LAYERS: where it stands decides what it may import."""
    unplaced = []
    for module in MODULES:
        try:
            layer(module)
        except StopIteration:
            unplaced.append(module)
    assert not unplaced


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
    up = [
        f"{module} ({LAYERS[layer(module)][0]}) imports {target} ({LAYERS[layer(target)][0]})"
        for target in sorted(GRAPH[module])
        if layer(target) > layer(module)
        or (LAYERS[layer(target)][0] == "benchmarks" and not module.startswith(("gpt2lab.bench", "gpt2lab.cli")))
    ]
    assert not up


def test_no_import_cycles():
    """Tarjan's strongly connected components: any with two or more modules is a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles


def test_few_modules_at_the_top():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


def test_every_module_reads_in_one_sitting():
    long = {module: n for module, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long


def test_a_source_checkout_reads_its_own_conf():
    """From a checkout, the config tree is its conf/ (edited in place, where presets cp and the wizard write), not
    the copy an install made: config/tree.py sits two levels below the checkout."""
    from gpt2lab.config import config_path

    assert config_path() == str(PACKAGE.parent / "conf")


def test_every_package_is_installed():
    """pyproject.toml lists the packages a wheel holds: a package missing there works from a checkout (an editable
    install reads the tree) and is absent from a real install."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {module_name(p) for p in PACKAGE.rglob("__init__.py")}
    assert packages - listed == set()
