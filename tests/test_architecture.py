"""The package layers (DESIGN.md): engine <- policy <- lightning integration <- recipe support.

Static checks over every module's imports (function-level imports included) and one runtime check
that the engine works with Lightning unimportable."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lightning_tp"
LEAVES = {"lightning_tp.errors", "lightning_tp._compat"}  # import nothing of the project's
# package -> what its modules may import from lightning_tp (besides the leaves)
ALLOWED = {
    "lightning_tp.engine": {"lightning_tp.engine"},
    "lightning_tp.policy": {"lightning_tp.engine", "lightning_tp.policy"},
    "lightning_tp.lightning": {"lightning_tp.engine", "lightning_tp.policy", "lightning_tp.lightning"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module ``path`` imports anywhere in its body (``from pkg import mod`` counts as ``pkg.mod``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(path, modules) if m in modules} for name, path in modules.items()}


def test_engine_imports_no_lightning():
    offenders = {}
    for name, path in _modules().items():
        if name.startswith("lightning_tp.engine") or name in LEAVES:
            bad = sorted(m for m in _imports(path, {}) if m.split(".")[0] in ("lightning", "pytorch_lightning"))
            if bad:
                offenders[name] = bad
    assert not offenders, f"the engine must not import Lightning: {offenders}"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_downward(package):
    graph = _graph()
    wrong = {}
    for name, targets in graph.items():
        if name != package and not name.startswith(package + "."):
            continue
        bad = sorted(
            t for t in targets if t not in LEAVES and not any(t == a or t.startswith(a + ".") for a in ALLOWED[package])
        )
        if bad:
            wrong[name] = bad
    assert not wrong, f"{package} imports from a higher layer: {wrong}"


def test_leaves_import_nothing_of_the_project():
    graph = _graph()
    assert all(not (graph[leaf] - {"lightning_tp"}) for leaf in LEAVES), {leaf: graph[leaf] for leaf in LEAVES}


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt == "lightning_tp":
                continue  # the package root imports everything (public names); submodules never need it
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            pytest.fail(f"import cycle: {' -> '.join(cycle)}")


def test_graph_sees_function_level_imports(tmp_path):
    """The checks above would miss a cycle hidden in a function if the scan skipped function bodies."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from lightning_tp.policy import plan\n")
    assert "lightning_tp.policy.plan" in _imports(probe, _modules())


def test_engine_runs_with_lightning_unimportable():
    code = textwrap.dedent(
        f"""
        import sys, types
        sys.modules["lightning"] = None  # any import of lightning raises ImportError
        sys.modules["pytorch_lightning"] = None
        pkg = types.ModuleType("lightning_tp")  # the package without its __init__ (which registers the strategy)
        pkg.__path__ = [{str(ROOT)!r}]
        sys.modules["lightning_tp"] = pkg
        import torch
        from lightning_tp.engine import comm, layers, loss, mesh, random, sequence, sharding
        spec = sharding.ShardSpec(dim=0, sizes=(6,), tp_size=2)
        full = torch.arange(12.0).view(6, 2)
        assert torch.equal(spec.unshard([spec.shard(full, 0), spec.shard(full, 1)]), full)
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
