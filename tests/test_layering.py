"""The package's import structure: format -> kernels -> modules -> hf -> pruning, each layer importing only the
ones before it (and itself); no import cycle anywhere, counting imports inside functions too; every module
imports in a fresh interpreter. Everything else (the package root, cli, console, evaluation, bench, demo) is a
top layer that no core module imports."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
PKG = os.path.join(SRC, "venom_hf")

# core layer of a module, by its first name below venom_hf; anything else is a top layer
LAYERS = {"format": 0, "kernels": 1, "modules": 2, "hf": 3, "pruning": 4}


def modules() -> dict[str, str]:
    """{dotted module name: file} of every module of src/venom_hf (packages as their __init__)."""
    out = {}
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), SRC)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(d, f)
    return out


def imports(name: str, path: str, known: dict[str, str]) -> set[str]:
    """The venom_hf modules that ``name`` imports anywhere in its file (top level or inside functions)."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from X import y`: the module X.y when y is one, else a name defined by X
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known]
            targets = subs + ([mod] if len(subs) < len(node.names) else [])
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import venom_hf.kernels.ops` names a module; strip to the longest known
                t = t.rpartition(".")[0]
            if t.split(".")[0] == "venom_hf" and t != name:
                found.add(t)
    return found


def layer(name: str):
    parts = name.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_the_scan_sees_relative_absolute_and_function_level_imports():
    g = graph()
    assert "venom_hf.format" in g["venom_hf.kernels.ops"]  # from ..format import ...
    assert "venom_hf.kernels.configs" in g["venom_hf.kernels.ops"]  # from . import configs
    assert "venom_hf.hf" in g["venom_hf.pruning.callback"]  # a function-level `from ..hf import compress`
    assert "venom_hf.hf.quantizer" in g["venom_hf.hf.packing"]


def test_layers_import_only_earlier_layers():
    bad = []
    for name, deps in graph().items():
        mine = layer(name)
        if mine is None:
            continue  # top layer
        for dep in deps:
            theirs = layer(dep)
            if theirs is None or theirs > mine:
                bad.append(f"{name} imports {dep}")
    assert not bad, "layering violations:\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(n, path):
        state[n] = 1
        for d in sorted(g.get(n, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n, [n])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_demo_assets_stay_out_of_the_core():
    for name, deps in graph().items():
        if layer(name) is not None:
            assert not any(d.startswith("venom_hf.demo") for d in deps), name


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(modules())
    code = ("import importlib, sys, traceback\nfailed = []\n"
            f"for n in {names!r}:\n"
            "    try:\n        importlib.import_module(n)\n"
            "    except Exception:\n        failed.append(n + ': ' + traceback.format_exc(limit=3))\n"
            "print('\\n'.join(failed)); sys.exit(1 if failed else 0)\n")
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
