"""The folder layout is the architecture: each package imports only the layers below it, the
torch-free layers import no torch-side library, and no two modules import each other in a circle.
Every layer folder installs as `sllm.<folder>`; bench/ (not installed) uses the same names.
Read from the source with `ast` (imports inside functions count too), so a violation fails here
before any install or role hits it."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# package -> the project packages it may import (itself included)
ALLOWED = {
    "sentences": {"sentences"},
    "protos": {"protos"},
    "runtime": {"runtime", "sentences"},
    "edge": {"edge", "runtime", "protos", "sentences"},
    "modeling": {"modeling", "runtime", "sentences"},
    "cloud": {"cloud", "modeling", "runtime", "protos", "sentences"},
    "training": {"training", "modeling", "runtime", "sentences"},
    "export": {"export", "training", "modeling", "runtime", "sentences"},
    "bench": {"bench", "edge", "cloud", "export", "training", "modeling", "runtime", "protos", "sentences"},
}
TORCH_FREE = ("sentences", "protos", "runtime", "edge")
TORCH_SIDE = {"torch", "transformers", "safetensors", "onnx", "onnxscript", "matplotlib"}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages, under the name it
    imports as: sllm.<layer>... for the layer folders, bench... for the (uninstalled) bench."""
    out = {}
    for package in ALLOWED:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name if package == "bench" else f"sllm.{name}"] = path
    return out


def _layer(module: str) -> str | None:
    """The layer a dotted module name belongs to (sllm.edge.chat -> edge), or None if not ours."""
    parts = module.split(".")
    if parts[0] == "sllm" and len(parts) > 1 and parts[1] in ALLOWED:
        return parts[1]
    return "bench" if parts[0] == "bench" else None


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every absolute module name `path` imports, at any depth (`from a import b` gives a.b if that
    is a module, else a)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{alias.name}" for alias in node.names]
            found = [s for s in subs if s in MODULES]
            names.update(found or [node.module])
    return names


def test_every_package_imports_only_the_layers_below_it():
    problems = []
    for name, path in MODULES.items():
        package = _layer(name)
        for imported in _imports(path):
            layer = _layer(imported)
            if layer is not None and layer not in ALLOWED[package]:
                problems.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert not problems, "layer violations:\n" + "\n".join(problems)


def test_no_module_imports_a_layer_by_its_bare_folder_name():
    """`import edge` would work only from a checkout: the install has sllm.edge and no top-level edge."""
    bare = set(ALLOWED) - {"bench"}
    files = list(MODULES.values()) + sorted((ROOT / "tests").glob("*.py"))
    problems = [f"{path.relative_to(ROOT)} imports {imported}" for path in files
                for imported in _imports(path) if imported.split(".")[0] in bare]
    assert not problems, "import these as sllm.<layer>:\n" + "\n".join(problems)


def test_torch_free_layers_import_no_torch_side_library():
    problems = [f"{path.relative_to(ROOT)} imports {imported}"
                for name, path in MODULES.items() if _layer(name) in TORCH_FREE
                for imported in _imports(path) if imported.split(".")[0] in TORCH_SIDE]
    assert not problems, "the edge install has none of these:\n" + "\n".join(problems)


def test_no_import_cycles():
    graph = {name: {m for m in _imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}
    # a package's __init__ is imported by each of its modules; an edge into an __init__ that imports
    # nothing back cannot close a circle, so the plain graph is exact
    cycles = _strongly_connected(graph)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(sorted(c)) for c in cycles)


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(component)
    return out


def test_the_checker_sees_a_violation_and_a_cycle():
    """The checks above must be able to fail: a torch import in edge and a two-module circle."""
    assert "torch" in _imports(ROOT / "modeling" / "opt_graft.py")
    assert _strongly_connected({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [{"a", "b"}]
    assert _strongly_connected({"a": {"b"}, "b": set()}) == []
