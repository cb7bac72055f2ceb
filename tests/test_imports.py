"""Dependencies point one way: no module imports one that imports it back (function-local imports
count: a lazy import hides a cycle from the interpreter, not from the reader), the model depends
only on config, the KV cache and the kernels, and the command line starts without torch."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "stablecode"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its source."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in modules:
                candidates = [node.value]  # a module named by string: imported with import_module
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: climb from this module's package
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from a import b` imports the module a.b when there is one, else a name of a.
                candidates = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                              for alias in node.names]
            else:
                continue
            for target in candidates:
                while target and target not in modules:  # `import a.b.c` of a name inside a.b
                    target = target.rpartition(".")[0]
                # A module may use its own package (the package is already being imported).
                if target and target != name and not name.startswith(target + "."):
                    imported.add(target)
        graph[name] = imported
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each cycle once, as the path of modules from the first back to it."""
    cycles, seen_cycles = [], set()
    state = {}  # module -> "open" while on the current path, "done" after

    def walk(start):
        path, iterators = [start], [iter(sorted(graph[start]))]
        state[start] = "open"
        while path:
            target = next(iterators[-1], None)
            if target is None:
                state[path.pop()] = "done"
                iterators.pop()
            elif state.get(target) == "open":
                cycle = path[path.index(target):]
                key = frozenset(cycle)
                if key not in seen_cycles:
                    seen_cycles.add(key)
                    cycles.append(cycle + [target])
            elif target not in state:
                state[target] = "open"
                path.append(target)
                iterators.append(iter(sorted(graph[target])))

    for module in sorted(graph):
        if module not in state:
            walk(module)
    return cycles


def test_the_cycle_finder_sees_function_local_imports(tmp_path):
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_counts_function_local_and_relative_imports():
    graph = import_graph()
    # cli.py imports `complete`'s API inside a function, and names its commands' modules as
    # strings for lazy registration: both are edges.
    assert "stablecode.kernels" in graph["stablecode.model"]
    assert "stablecode.api" in graph["stablecode.cli"]
    assert "stablecode.server.cli" in graph["stablecode.cli"]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_model_imports_only_config_cache_and_kernels():
    source = (PACKAGE / "model.py").read_text(encoding="utf-8")
    imported = set(re.findall(r"^from stablecode\.(\w+)", source, re.MULTILINE))
    imported |= set(re.findall(r"^\s*import stablecode\.(\w+)", source, re.MULTILINE))
    assert imported <= {"config", "kv_cache", "kernels"}, imported
    local = set(re.findall(r"^\s+from stablecode\.(\w+)", source, re.MULTILINE))
    assert local <= {"config", "kv_cache", "kernels"}, local


def python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          timeout=120).stdout.strip()


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["complete", "--help"], ["serve", "--help"],
                                  ["eval", "humaneval", "--help"], ["quantize", "--help"], ["index", "--help"]])
def test_help_and_version_do_not_import_torch(argv):
    imported = python(
        "import sys\n"
        "from stablecode.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('stablecode.')), file=sys.stderr)\n"
        "print('torch' in sys.modules)")
    assert imported.splitlines()[-1] == "False"


def test_torch_free_modules_stay_torch_free():
    modules = ["stablecode.atomic", "stablecode.machine", "stablecode.registry", "stablecode.options",
               "stablecode.config", "stablecode.tokenizer", "stablecode.cli", "stablecode.attribution",
               "stablecode.data.packing", "stablecode.eval.humaneval"]
    assert python(f"import sys\nfor m in {modules!r}: __import__(m)\nprint('torch' in sys.modules)") == "False"


def test_a_completion_does_not_import_the_compiler():
    # torch._dynamo (and sympy with it) takes about a second and 70 MB to import: a completion,
    # kernels loaded, never needs it.
    imported = python(
        "import sys\n"
        "from stablecode import kernels\n"
        "from stablecode.api import Completer\n"
        "kernels.load(build=False)\n"
        "Completer('stablecode-nano').complete('def add(a, b):', max_new_tokens=4)\n"
        "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))")
    assert imported.splitlines()[-1] == "[]"
