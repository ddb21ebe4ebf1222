"""The shape of the code: one owner per concern means no import circles, no module over 500 lines, and layers
that point one way (docs/architecture.md): every import goes to the same layer or one below, and the layers under
torch's import torch nowhere at module level, so the llama.cpp path of `memcli verify` starts without it."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "memcli"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The memcli modules a file imports, anywhere in it (functions included): a circle through a lazy import
    is still a circle."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in modules else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def test_no_import_circles():
    files = [p for p in PACKAGE.rglob("*.py")]
    modules = {_module_name(p) for p in files}
    graph = {_module_name(p): _imports(p, modules) for p in files}
    for package in [m for m in modules if (PACKAGE.parent / m.replace(".", "/") / "__init__.py").exists()]:
        graph[package] = set()  # a package's __init__ imports nothing here; its submodules are the edges
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_module_over_500_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}


# Bottom to top. A module belongs to the first layer naming it or a package above it.
LAYERS = [
    ("core", ["memcli", "memcli.errors", "memcli.signals", "memcli.runs", "memcli.scoring", "memcli.batching",
              "memcli.verdicts", "memcli.corpus", "memcli.datagen", "memcli.gguf.reader", "memcli.quants"]),
    ("models", ["memcli.models", "memcli.config", "memcli.llamacpp"]),
    ("gguf", ["memcli.gguf"]),
    # the llama.cpp scorer, torch-free: `verify` runs it, and so does `train --deploy` on the files it makes
    ("llama", ["memcli.verify.llama", "memcli.verify.checks", "memcli.verify.report"]),
    ("torch", ["memcli.lora", "memcli.objectives", "memcli.forward", "memcli.train", "memcli.sweep", "memcli.locality",
               "memcli.preserve", "memcli.deploy"]),
    ("commands", ["memcli.verify", "memcli.law", "memcli.ask"]),
    ("interface", ["memcli.terminal", "memcli.doctor", "memcli.cli", "memcli.cli_bench", "memcli.__main__",
                   "memcli.bench"]),
]
TORCH_FREE = ("core", "models", "gguf", "llama")  # no module-level import of torch, transformers or peft
HEAVY = ("torch", "transformers", "peft")


def _layer(module: str) -> int:
    for i, (_, names) in enumerate(LAYERS):
        if module in names:
            return i
    for i, (_, names) in enumerate(LAYERS):
        if any(module.startswith(n + ".") for n in names if n != "memcli"):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layout.py")


def _graph() -> dict[str, set[str]]:
    files = list(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _imports(p, modules) for p in files}


def test_every_import_points_down_or_sideways():
    upward = [f"{a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]})"
              for a, targets in sorted(_graph().items()) for b in sorted(targets) if _layer(b) > _layer(a)]
    assert upward == []


def test_the_layers_under_torch_import_it_nowhere_at_module_level():
    found = []
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        if LAYERS[_layer(name)][0] not in TORCH_FREE:
            continue
        for node in ast.parse(path.read_text()).body:  # module level only: a function may import torch lazily
            if isinstance(node, ast.Import):
                found += [f"{name}: import {a.name}" for a in node.names if a.name.split(".")[0] in HEAVY]
            elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in HEAVY:
                found.append(f"{name}: from {node.module} import ...")
    assert found == []


def test_the_llama_cpp_verify_path_imports_no_torch():
    """What the layers promise, as a user's process sees it."""
    code = "import sys, memcli.verify.llama; print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
