"""The package layers of docs/ARCHITECTURE.md, enforced.

    vchat                 framework-free core: numpy, PIL, tokenizers; imports no other first-party package
    vchat_torch           PyTorch model and trainer: imports vchat, never vchat_jax nor a JAX package
    vchat_jax             Flax model and trainer: imports vchat, never vchat_torch nor a torch package
    convert, crosscheck,  the layer above both frameworks: import anything below, and each other
    demo                  without a cycle

Every import statement counts, at module level or inside a function (a lazy import is still a
dependency), and so does importlib.import_module / __import__ of a literal name. Each failure names
the file and line of the offending import. The `vchat` command (vchat/cli.py) names its subcommands'
modules as strings and imports them only when run: that is the one upward reference, by design.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOP_LAYER = ("convert", "crosscheck", "demo")
PACKAGES = ("vchat", "vchat_torch", "vchat_jax", *TOP_LAYER)
TORCH_SIDE = ("torch", "torchvision", "transformers", "deepspeed", "peft", "safetensors.torch")
JAX_SIDE = ("jax", "jaxlib", "flax", "optax", "orbax", "safetensors.flax")
FRAMEWORKS = ("torch", "jax", "flax", "transformers", "deepspeed", "optax", "orbax", "peft")
# What each package must not import (first-party packages and third-party frameworks).
FORBIDDEN = {
    "vchat": ("vchat_torch", "vchat_jax", *TOP_LAYER, *TORCH_SIDE, *JAX_SIDE),
    "vchat_torch": ("vchat_jax", *TOP_LAYER, *JAX_SIDE),
    "vchat_jax": ("vchat_torch", *TOP_LAYER, *TORCH_SIDE),
    **{top: () for top in TOP_LAYER},
}


@dataclass(frozen=True)
class Import:
    path: str  # relative to the repository root
    line: int
    module: str  # absolute dotted name

    def where(self) -> str:
        return f"{self.path}:{self.line} imports {self.module}"


def _module_of(path: str) -> list[str]:
    parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imports_of(path: str, package: list[str] | None = None) -> list[Import]:
    """Every import of a file (module level and inside functions), relative ones made absolute against
    `package` (by default the file's own package)."""
    rel = os.path.relpath(path, ROOT)
    if package is None:
        package = _module_of(path) if path.endswith("__init__.py") else _module_of(path)[:-1]
    out = []
    for node in ast.walk(ast.parse(open(path).read(), rel)):
        if isinstance(node, ast.Import):
            out += [Import(rel, node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            out.append(Import(rel, node.lineno, base))
            out += [Import(rel, node.lineno, f"{base}.{a.name}") for a in node.names]  # `from safetensors import torch`
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None) == "__import__")):
            out.append(Import(rel, node.lineno, node.args[0].value))
    return out


def package_files(package: str) -> list[str]:
    files = []
    for folder, dirs, names in os.walk(os.path.join(ROOT, package)):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".py")]
    return files


def _matches(module: str, names) -> str | None:
    return next((n for n in names if module == n or module.startswith(n + ".")), None)


def all_imports() -> dict[str, list[Import]]:
    return {p: [i for f in package_files(p) for i in imports_of(f)] for p in PACKAGES}


def test_the_packages_exist():
    for p in PACKAGES:
        assert os.path.isfile(os.path.join(ROOT, p, "__init__.py")), f"{p}/__init__.py is missing"


def test_each_package_imports_only_what_its_layer_allows():
    bad = {}  # one line per (file, line, forbidden name)
    for package, imps in all_imports().items():
        for i in imps:
            if (hit := _matches(i.module, FORBIDDEN[package])):
                bad.setdefault((i.path, i.line, hit), f"{i.where()} ({package} must not import {hit})")
    bad = list(bad.values())
    assert not bad, "imports across the layers of docs/ARCHITECTURE.md:\n  " + "\n  ".join(bad)


def test_no_cycle_between_packages():
    edges: dict[str, dict[str, Import]] = {p: {} for p in PACKAGES}
    for package, imps in all_imports().items():
        for i in imps:
            target = i.module.split(".")[0]
            if target in PACKAGES and target != package:
                edges[package].setdefault(target, i)

    def cycle_from(start: str, node: str, seen: tuple[str, ...]) -> tuple[str, ...] | None:
        for nxt in sorted(edges[node]):
            if nxt == start:
                return (*seen, nxt)
            if nxt not in seen:
                found = cycle_from(start, nxt, (*seen, nxt))
                if found:
                    return found
        return None

    for p in PACKAGES:
        cycle = cycle_from(p, p, (p,))
        assert cycle is None, ("package cycle " + " -> ".join(cycle) + ":\n  "
                               + "\n  ".join(edges[a][b].where() for a, b in zip(cycle, cycle[1:])))


def test_the_core_imports_no_framework_at_runtime():
    """Import every vchat.* module in a fresh interpreter, one at a time, and name the first that pulls
    in a framework (a check of what the AST scan cannot see: a dependency importing one)."""
    code = f"""
import importlib, json, pkgutil, sys
import vchat
FRAMEWORKS = {FRAMEWORKS!r}
def loaded():
    return sorted(m for m in sys.modules if m.split(".")[0] in FRAMEWORKS)
names = sorted(m.name for m in pkgutil.walk_packages(vchat.__path__, "vchat.") if not m.name.endswith("__main__"))
culprits = {{}}
for name in names:
    before = set(loaded())
    importlib.import_module(name)
    new = sorted(set(loaded()) - before)
    if new:
        culprits[name] = new[:5]
print(json.dumps({{"modules": names, "culprits": culprits}}))
"""
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["modules"]) >= 20 and "vchat.data.synthetic" in out["modules"]  # the walk found the tree
    assert not out["culprits"], "vchat modules that import a framework: " + "; ".join(
        f"{m} -> {', '.join(mods)}" for m, mods in out["culprits"].items())


def test_the_scanner_sees_lazy_relative_and_dynamic_imports(tmp_path):
    """The scan itself, on a made-up module of vchat_jax: function-level, relative and importlib imports count."""
    path = str(tmp_path / "probe.py")
    src = ("import numpy\n"
           "def f():\n"
           "    import torch.nn\n"
           "    from ..vchat_torch import model\n"
           "    from safetensors import torch as st\n"
           "    importlib.import_module('vchat_torch.model')\n")
    with open(path, "w") as f:
        f.write(src)
    found = {(i.line, i.module) for i in imports_of(path, package=["vchat_jax"])}
    assert {(3, "torch.nn"), (4, "vchat_torch"), (4, "vchat_torch.model"), (5, "safetensors.torch"),
            (6, "vchat_torch.model")} <= found
    hits = {m: _matches(m, FORBIDDEN["vchat_jax"]) for _, m in found}
    assert hits["torch.nn"] == "torch" and hits["vchat_torch.model"] == "vchat_torch"
    assert hits["safetensors.torch"] == "safetensors.torch" and hits["numpy"] is None
