"""The package's import graph (every import, at module level or inside a function) has no cycle:
a shared piece lives in a module below both of its users."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"quantsink": REPO / "quantsink", "quantsink.kernels": REPO / "kernels"}


def _modules() -> dict[str, Path]:
    mods = {}
    for prefix, root in ROOTS.items():
        for f in root.rglob("*.py"):
            parts = f.relative_to(root).with_suffix("").parts
            name = ".".join((prefix, *parts))
            mods[name.removesuffix(".__init__")] = f
    return mods


def _targets(node: ast.AST, module: str, is_package: bool, mods: dict[str, Path]) -> set[str]:
    """The package modules an import statement loads (``from a import b``: ``a.b`` if a module)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in mods}
    if not isinstance(node, ast.ImportFrom):
        return set()
    base = node.module or ""
    if node.level:
        pkg = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
    return {f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names} & set(mods)


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, f in mods.items():
        tree = ast.parse(f.read_text(encoding="utf-8"))
        edges = set()
        for node in ast.walk(tree):
            edges |= _targets(node, name, f.name == "__init__.py", mods)
        graph[name] = edges - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_finder_sees_a_cycle_through_function_level_imports() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    src = "def f():\n    from quantsink.weights import export\n"
    node = ast.parse(src).body[0].body[0]
    mods = {"quantsink.weights": Path(), "quantsink.weights.export": Path()}
    assert _targets(node, "quantsink.weights.shards", False, mods) == {"quantsink.weights.export"}


def test_no_import_cycle_in_the_package() -> None:
    graph = import_graph()
    assert len(graph) > 80 and "quantsink.kernels.cpu_ext" in graph
    assert graph["quantsink.weights.export"] >= {"quantsink.weights.ct_export", "quantsink.weights.shards"}
    assert cycles(graph) == []
