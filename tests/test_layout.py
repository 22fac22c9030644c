"""The code layout's contracts: imports go one way, and the docs list exactly the registered methods.

- The import graph of ``autorank/`` — module-level *and* function-level imports,
  read from the source with ``ast`` — has no cycle (a package's ``__init__``
  importing its own children, and a child importing its package, are not edges).
- The README's methods table, ``search_spaces/README.md`` and every shipped
  search space name only registered methods, and the README's table lists all of
  them with the layer kinds each one claims.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from autorank import methods
from autorank.search.space import builtin_spaces

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "autorank"


# ---------------------------------------------------------------------- import graph
def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root.parent).with_suffix("")
        name = ".".join(rel.parts)
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        out[name] = path
    return out


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``, at module level or inside functions."""
    mods = _modules(root)
    pkg = root.name

    def resolve(name: str):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_init = path.name == "__init__.py"
        package = mod if is_init else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - (node.level - 1)] + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                if t.split(".")[0] != pkg:
                    continue
                r = resolve(t)
                if r is None or r == mod:
                    continue
                if mod.startswith(r + ".") and mods[r].name == "__init__.py":
                    continue  # a module importing its own package
                graph[mod].add(r)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    pkg = tmp_path / "toypkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from toypkg import a\n")
    (pkg / "a.py").write_text("from toypkg.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from toypkg import a  # function-level\n    from .c import g\n")
    (pkg / "sub" / "c.py").write_text("def g():\n    pass\n")
    graph = import_graph(pkg)
    assert graph["toypkg.sub.b"] == {"toypkg.a", "toypkg.sub.c"}
    assert cycles(graph) == [["toypkg.a", "toypkg.sub.b"]]


def test_autorank_imports_have_no_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles among autorank's modules: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_module_is_much_over_600_lines():
    big = {m: n for m, p in _modules(PACKAGE).items() if (n := len(p.read_text().splitlines())) > 650}
    assert not big, f"modules over 650 lines (split them along their concerns): {big}"


# ---------------------------------------------------------------------- the docs list the registry
def _readme_methods_table() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Methods"):]
    rows = {}
    for line in section.splitlines()[1:]:
        if line.startswith("## "):
            break
        m = re.match(r"\|\s*`([a-z0-9-]+)`\s*\|([^|]*)\|", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


_KIND_WORDS = {"linear": "Linear", "conv1d": "Conv1D", "conv2d": "Conv2d"}


def test_readme_methods_table_lists_exactly_the_registry():
    rows = _readme_methods_table()
    assert sorted(rows) == methods.available()
    for name, layers in rows.items():
        m = methods.get(name)
        claimed = {k for k, word in _KIND_WORDS.items() if word in layers}
        assert claimed == set(m.layer_kinds), f"README says {name} applies to {layers.strip()!r}; it claims {m.layer_kinds}"


@pytest.mark.parametrize("name", sorted(builtin_spaces()))
def test_shipped_search_spaces_name_registered_methods(name):
    data = yaml.safe_load((ROOT / "search_spaces" / f"{name}.yaml").read_text())
    listed = data["methods"]
    if listed == "all":
        return
    assert "none" in listed
    for m in listed:
        if m != "none":
            assert methods.get(m).name == m, f"search_spaces/{name}.yaml names {m!r}, registered as {methods.get(m).name!r}"


def test_search_spaces_readme_agrees_with_the_files():
    text = (ROOT / "search_spaces" / "README.md").read_text()
    for line in text.splitlines():
        m = re.match(r"\|\s*`([a-z0-9_-]+)\.yaml`\s*\|[^|]*\|([^|]*)\|", line)
        if not m:
            continue
        data = yaml.safe_load((ROOT / "search_spaces" / f"{m.group(1)}.yaml").read_text())
        listed = [x.strip() for x in m.group(2).split(",")]
        if data["methods"] == "all":
            assert listed == ["all"]
        else:
            assert listed == [x for x in data["methods"] if x != "none"], f"search_spaces/README.md row for {m.group(1)}.yaml"


# ---------------------------------------------------------------------- the linter
def test_the_linter_passes():
    """`ruff check` (pyproject.toml's [tool.ruff]) over the package, the tests, the benchmarks and the examples."""
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it is in the test extra: pip install -e '.[test]')")
    p = subprocess.run([ruff, "check", "--no-cache", "autorank", "tests", "benchmarks", "examples"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
