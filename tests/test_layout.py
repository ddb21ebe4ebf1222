"""The shape of the code, read from its folders: each top-level folder of memcli/ is a layer (memcli.LAYERS, bottom
to top); imports point down or sideways, never up, and never round in a circle; the layers under training import
no torch at module level, so the llama.cpp path of `memcli verify` starts without it; every package lists its own
modules, and docs/architecture.md is generated from those lists."""

import ast
import re
import subprocess
import sys
import warnings
from pathlib import Path

import memcli

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "memcli"
LAYER_NAMES = [name for name, _ in memcli.LAYERS]
HEAVY = ("torch", "transformers", "peft")
LIBRARIES = ("torch", "numpy", "transformers", "peft", "gguf", "typer", "scipy", "yaml")  # no module file named so
ENTRY_POINTS = {"memcli", "memcli.__main__"}  # the package itself (imports nothing) and `python -m memcli`
# the command modules of the command line: lazy command loading keeps start-up short
LAZY_EXEMPT = tuple(f"memcli/cli/{m}.py" for m in ("app", "bench", "train", "export", "verify", "law"))
MAX_LAZY = 25


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _targets(path: Path, node, modules: set[str]) -> list[str]:
    """The memcli modules one import statement names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in modules]
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    base = node.module or ""
    if node.level:
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
    found = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    return [m for m in found if m in modules]


def _imports(path: Path, modules: set[str], module_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else ast.walk(tree)
    found = {m for n in nodes if isinstance(n, (ast.Import, ast.ImportFrom)) for m in _targets(path, n, modules)}
    return found - {_module_name(path)}


def _graph(module_level_only: bool = False) -> dict[str, set[str]]:
    files = _files()
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _imports(p, modules, module_level_only) for p in files}


def _layer(module: str) -> int | None:
    """A module's layer: the folder it lives in under memcli/ (None for the entry points)."""
    if module in ENTRY_POINTS:
        return None
    folder = module.split(".")[1]
    assert folder in LAYER_NAMES, f"{module} lives in {folder}/, which is no layer of memcli.LAYERS"
    return LAYER_NAMES.index(folder)


def test_every_module_lives_in_a_layer_folder():
    loose = [p.name for p in PACKAGE.glob("*.py") if _module_name(p) not in ENTRY_POINTS]
    assert loose == []
    packages = [p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    assert sorted(packages) == sorted(LAYER_NAMES)


def test_no_import_circles():
    """Lazy imports included: a circle through an import inside a function is still a circle."""
    graph = _graph()
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


def test_no_package_circles_within_a_layer():
    """The folders inside a layer (commands/verify, commands/law, ...) depend on each other one way only."""
    edges = {(a.rsplit(".", 1)[0], b.rsplit(".", 1)[0]) for a, targets in _graph().items() for b in targets
             if not {a, b} & ENTRY_POINTS}
    mutual = sorted({tuple(sorted((a, b))) for a, b in edges if a != b and (b, a) in edges})
    assert mutual == []


def test_every_import_points_down_or_sideways():
    upward = []
    for a, targets in sorted(_graph().items()):
        for b in sorted(targets):
            la, lb = _layer(a), _layer(b)
            if la is not None and lb is not None and lb > la:
                upward.append(f"{a} ({LAYER_NAMES[la]}) imports {b} ({LAYER_NAMES[lb]})")
    assert upward == []


def test_the_layers_under_training_import_no_torch_at_module_level():
    found = []
    for path in _files():
        layer = _layer(_module_name(path))
        if layer is None or LAYER_NAMES[layer] not in memcli.TORCH_FREE:
            continue
        for node in ast.parse(path.read_text()).body:  # module level only: a function may import torch lazily
            if isinstance(node, ast.Import):
                found += [f"{path.name}: import {a.name}" for a in node.names if a.name.split(".")[0] in HEAVY]
            elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in HEAVY:
                found.append(f"{path.name}: from {node.module} import ...")
    assert found == []


def test_the_llama_cpp_verify_path_imports_no_torch():
    """What the layers promise, as a user's process sees it."""
    code = ("import sys, memcli.commands.verify.run, memcli.llama.scorer; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_in_function_imports_are_few_and_say_why():
    """memcli imports sit at module level, where a reader sees a module's dependencies; the few inside a function
    (keeping torch off the llama.cpp path, or start-up short) each carry their reason in a comment."""
    modules = {_module_name(p) for p in _files()}
    lazy, silent = [], []
    for path in _files():
        rel = str(path.relative_to(ROOT))
        if rel in LAZY_EXEMPT:
            continue
        tree = ast.parse(path.read_text())
        lines = path.read_text().splitlines()
        top = {id(n) for n in tree.body}
        top |= {id(n) for block in tree.body if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                for n in block.body}  # annotations only: never run
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top and _targets(path, node, modules):
                lazy.append(f"{rel}:{node.lineno}")
                if "#" not in lines[node.end_lineno - 1] and "#" not in lines[node.lineno - 2]:
                    silent.append(f"{rel}:{node.lineno}")
    assert silent == []
    assert len(lazy) <= MAX_LAZY, lazy


def test_long_modules_are_a_hint_to_split_by_concern():
    """A module near 500 lines is a hint to split it by concern (a warning in the test summary), never a number to
    squeeze under; past 1,000 lines it has surely grown a second concern."""
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in _files()}
    for name, n in sorted(sizes.items()):
        if n > 500:
            warnings.warn(f"{name} has {n} lines: does it own more than one concern?", stacklevel=1)
    assert {name: n for name, n in sizes.items() if n > 1000} == {}


def test_no_module_is_named_after_a_library():
    assert [str(p.relative_to(ROOT)) for p in _files() if p.stem in LIBRARIES] == []


def _listed(package: Path) -> list[tuple[str, str]]:
    """The `- \\`module\\`: summary` lines of a package's docstring, continuation lines joined."""
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    items = re.findall(r"^- `(\w+)`: (.+?)(?=^- `|\Z|^\S)", doc, flags=re.M | re.S)
    return [(name, " ".join(summary.split())) for name, summary in items]


def test_every_package_lists_its_own_modules():
    wrong = {}
    for init in sorted(PACKAGE.rglob("__init__.py")):
        package = init.parent
        if package == PACKAGE:
            continue
        real = sorted([p.stem for p in package.glob("*.py") if p.name != "__init__.py"]
                      + [p.name for p in package.iterdir() if (p / "__init__.py").exists()])
        listed = sorted(name for name, _ in _listed(package))
        if listed != real:
            wrong[str(package.relative_to(ROOT))] = {"listed": listed, "files": real}
    assert wrong == {}


def test_architecture_md_is_generated_from_the_code():
    """docs/architecture.md's layer and module tables are what docs/architecture.py writes from the code."""
    out = subprocess.run([sys.executable, str(ROOT / "docs" / "architecture.py"), "--check"], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_is_clean():
    """The lint the Python world uses, with the rules in pyproject.toml (line length, import order, unused names)."""
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", str(ROOT)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
