"""The import contract of ptjax/: layers, bottom to top, each importing only from below
(or its own layer, without a cycle), every import at module top, no private name imported
across modules. docs/development.md shows the same table."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ptjax")

# Bottom to top. A module may import from its own layer or any layer below it.
LAYERS = [
    ("errors", ["ptjax.errors"]),
    ("leaf utilities", ["ptjax.sharding", "ptjax.optim", "ptjax.verbalizers",
                        "ptjax.objectives", "ptjax.checkpoint", "ptjax.targets",
                        "ptjax.preemption", "ptjax.storage"]),
    ("models and data", ["ptjax.models", "ptjax.models.*", "ptjax.data", "ptjax.data.*",
                         "ptjax.prompts", "ptjax.export"]),
    ("config schema", ["ptjax.config", "ptjax.config.*"]),
    ("methods", ["ptjax.methods", "ptjax.methods.*"]),
    ("the step", ["ptjax.train", "ptjax.evaluation", "ptjax.aot"]),
    ("a run's data, directory and loop", ["ptjax.taskdata", "ptjax.rundir", "ptjax.loop"]),
    ("commands", ["ptjax.design", "ptjax.trained", "ptjax.run", "ptjax.pretrain",
                  "ptjax.plan", "ptjax.preflight", "ptjax.autoverbalizer", "ptjax.autotemplate",
                  "ptjax.multirun"]),
    ("sweeps, analysis, reports, the CLI, the package", [
        "ptjax.sweep", "ptjax.analysis", "ptjax.report", "ptjax.serving", "ptjax.commands",
        "ptjax.cli",
        "ptjax"]),
]
# Third-party packages that are optional extras (or, matplotlib, chosen a backend for
# before pyplot loads): the only imports allowed inside a function, with a noqa reason.
OPTIONAL = ("wandb", "tensorflow", "tensorflow_datasets", "torch", "matplotlib",
            "datasets", "fsspec", "aiohttp")


def modules(root: str) -> dict[str, str]:
    """{dotted module name: file} of the package at ``root``."""
    out = {}
    base = os.path.dirname(root)
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                parts = os.path.relpath(os.path.join(folder, f), base)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                out[".".join(parts)] = os.path.join(folder, f)
    return out


def layer_of(module: str) -> int:
    for i, (_, names) in enumerate(LAYERS):
        for name in names:
            if module == name or (name.endswith(".*") and module.startswith(name[:-1])):
                return i
    raise KeyError(module)


def imports(name: str, file: str, known: dict) -> list[tuple[int, str, str, bool]]:
    """(line, imported ptjax module, imported name or '', at module top) of ``file``."""
    with open(file, encoding="utf-8") as f:
        tree = ast.parse(f.read(), file)
    top = {id(n) for n in tree.body}
    package = name if file.endswith("__init__.py") else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.append((node.lineno, a.name, "", id(node) in top))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                target, imported = (full, "") if full in known else (base, a.name)
                out.append((node.lineno, target, imported, id(node) in top))
    return out


def problems(root: str = ROOT) -> list[str]:
    """Every break of the contract in the package at ``root``, one line each."""
    known = modules(root)
    found, graph = [], {m: set() for m in known}
    for name, file in sorted(known.items()):
        try:
            own = layer_of(name)
        except KeyError:
            found.append(f"{name}: in no layer; add it to LAYERS (and docs/development.md)")
            continue
        for line, target, imported, at_top in imports(name, file, known):
            where = f"{os.path.relpath(file, os.path.dirname(root))}:{line}"
            if not target.startswith("ptjax"):
                if not at_top and target.split(".")[0] not in OPTIONAL:
                    found.append(f"{where}: import of {target} inside a function")
                continue
            if not at_top:
                found.append(f"{where}: import of {target} inside a function")
            if imported.startswith("_") and imported != "__version__":
                found.append(f"{where}: private name {imported} imported from {target}")
            if target in known and target != name:
                graph[name].add(target)
                if layer_of(target) > own:
                    found.append(f"{where}: {name} ({LAYERS[own][0]}) imports {target} "
                                 f"({LAYERS[layer_of(target)][0]}), a layer above it")
    found += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return found


def cycles(graph: dict) -> list[list[str]]:
    """One cycle through each strongly connected group of two or more modules."""
    state, stack, out = {}, [], []

    def visit(v):
        state[v] = "open"
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == "open":
                out.append(stack[stack.index(w):] + [w])
            elif w not in state:
                visit(w)
        stack.pop()
        state[v] = "done"
    for v in sorted(graph):
        if v not in state:
            visit(v)
    return out


def test_ptjax_keeps_its_layers():
    assert problems() == []


@pytest.fixture
def package(tmp_path):
    shutil.copytree(ROOT, tmp_path / "ptjax", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path / "ptjax"


def _prepend(file, text):
    body = file.read_text()
    i = body.index("from __future__ import annotations\n") + len(
        "from __future__ import annotations\n")
    file.write_text(body[:i] + text + body[i:])


def test_an_upward_import_is_caught(package):
    _prepend(package / "sharding.py", "from ptjax.run import train\n")
    found = problems(str(package))
    assert any("ptjax.sharding (leaf utilities) imports ptjax.run (commands)" in p
               for p in found), found
    assert any(p.startswith("import cycle:") for p in found), found


def test_a_function_local_import_and_a_private_name_are_caught(package):
    (package / "optim.py").write_text((package / "optim.py").read_text()
                                      + "\n\ndef f():\n    from ptjax.errors import _x\n")
    found = problems(str(package))
    assert any("optim.py" in p and "inside a function" in p for p in found), found
    assert any("private name _x imported from ptjax.errors" in p for p in found), found


def test_a_new_module_must_be_placed(package):
    (package / "newthing.py").write_text("import os\n")
    assert problems(str(package)) == [
        "ptjax.newthing: in no layer; add it to LAYERS (and docs/development.md)"]


def test_the_package_imports_no_run_machinery():
    """``import ptjax`` (the public API: models, load_run, load_runs) stays light: the run
    directory's TensorBoard writer (tensorboardX, which imports torch where it is
    installed) and TFDS load only with a run or a TFDS task (benchmarks/gpu_suite.py
    checks the same on a GPU)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys, ptjax; print(sorted(m for m in ('tensorboardX', 'torch', "
            "'tensorflow', 'tensorflow_datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=root), check=True)
    assert out.stdout.strip() == "[]"
