"""The house rules of the code, checked on the source: no import cycles anywhere in featstore/,
pipelines/, trainers/ and cli.py (imports inside functions count: a lazy import only hides a
cycle), `featstore/` never imports pipelines/ or trainers/, nobody reaches into another module's
private names, and `featstore --help` imports no heavy library.

    python tests/test_imports.py      # prints the import graph's cycles, if any
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# source folder -> installed package (pyproject.toml's package-dir)
PACKAGES = {"featstore": "featstore", "pipelines": "featstore.pipelines", "trainers": "featstore.trainers"}


def modules() -> dict[str, str]:
    """Installed module name -> source file, for every module of the package and cli.py."""
    out = {"featstore.command.cli": os.path.join(ROOT, "cli.py")}
    for folder, package in PACKAGES.items():
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            rel = os.path.relpath(dirpath, os.path.join(ROOT, folder))
            prefix = package if rel == "." else package + "." + rel.replace(os.sep, ".")
            for f in files:
                if f.endswith(".py"):
                    out[prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"] = os.path.join(dirpath, f)
    return out


def imports_of(name: str, path: str, known: dict[str, str]) -> list[tuple[str, str]]:
    """(imported module, the name imported from it or '') for every import in the file, at any
    depth, `if TYPE_CHECKING:` blocks and imports inside functions included (each only hides a
    cycle), resolved to the package's modules."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    is_package = path.endswith("__init__.py")
    here = name if is_package else name.rpartition(".")[0]
    out = []

    def visit(node):
        if isinstance(node, ast.Import):
            out.extend((a.name, "") for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = here.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub, "") if sub in known else (base, a.name))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return [(m, n) for m, n in out if m in known]


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m, _ in imports_of(name, path, known)} - {name} for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def strongconnect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    return out


def test_no_import_cycles():
    edges = graph()
    assert len(edges) > 50 and "featstore.trainers.checkpoint" in edges  # the walk found the tree
    assert cycles(edges) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_layers():
    """featstore/ never imports pipelines/, trainers/ or the command; pipelines/ never trainers/.
    `featstore.__main__` (`python -m featstore`, what torchrun runs) is the command's entry point."""
    edges = graph()
    for name, deps in edges.items():
        if name == "featstore.__main__":
            assert deps <= {"featstore.command.cli", "featstore.command"}, deps
            continue
        if name.startswith("featstore.") and name.split(".")[1] not in ("pipelines", "trainers", "command"):
            assert not {d for d in deps if d.startswith(("featstore.pipelines", "featstore.trainers", "featstore.command"))}, name
        if name.startswith("featstore.pipelines"):
            assert not {d for d in deps if d.startswith(("featstore.trainers", "featstore.command"))}, name


# featstore/'s rooms (docs/DESIGN.md): what each may import of featstore itself.  errors and
# tokens are leaves every room may use; device is the jobs' device check.
LEAVES = ("featstore.errors", "featstore.tokens")
ROOMS = {
    "featstore.core": ("featstore.core", *LEAVES),
    "featstore.read": ("featstore.core", "featstore.read", *LEAVES),
    "featstore.store": ("featstore.core", *LEAVES),
    "featstore.loader": ("featstore.core", "featstore.read", "featstore.store", *LEAVES),
    "featstore.tools": ("featstore.core", "featstore.read", "featstore.store", "featstore.tools", *LEAVES),
    "featstore.models": ("featstore.models",),  # torch modules only, for pipelines/ and trainers/ alike
}


def room_of(name: str) -> str | None:
    return next((r for r in ROOMS if name == r or name.startswith(r + ".")), None)


def test_rooms():
    """core/ imports only itself (and the leaves), read/ the core, the store the core, the Loader
    the read path and the store, tools/ all of them; nobody but the command imports tools/."""
    edges = graph()
    wrong = []
    for name, deps in edges.items():
        for d in deps:
            room = room_of(name)
            if room and d.startswith("featstore.") and not d.startswith(ROOMS[room]) and d != room:
                wrong.append(f"{name} imports {d}")
            if d.startswith("featstore.tools") and room != "featstore.tools" and name != "featstore.command.cli":
                wrong.append(f"{name} imports {d} (only the command runs tools)")
    assert wrong == []
    assert {room_of(n) for n in edges} >= set(ROOMS)  # every room has modules


def test_the_two_trainers_never_import_each_other():
    """trainers/sharelock/ and trainers/uta/ share only the common trainers/ modules; the shared
    modules import neither (only the command module, which adds both trainers' commands)."""
    kinds = ("featstore.trainers.sharelock", "featstore.trainers.uta")
    wrong = []
    for name, deps in graph().items():
        if not name.startswith("featstore.trainers") or name == "featstore.trainers.commands":
            continue
        mine = next((k for k in kinds if name == k or name.startswith(k + ".")), None)
        wrong += [f"{name} imports {d}" for d in deps for k in kinds
                  if k != mine and (d == k or d.startswith(k + "."))]
    assert wrong == []
    assert {"featstore.trainers.uta.train", "featstore.trainers.sharelock.train"} <= set(graph())


def test_nobody_uses_another_modules_private_names():
    known = modules()
    offenders = []
    for name, path in known.items():
        for module, imported in imports_of(name, path, known):
            if imported.startswith("_") and module != name:
                offenders.append(f"{name} imports {module}.{imported}")
        tree = ast.parse(open(path, encoding="utf-8").read())
        aliases = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                   for a in n.names if f"{n.module}.{a.name}" in known or n.module is None or n.level}
        for n in ast.walk(tree):  # module.attribute: `checkpoint._read(...)`
            if (isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
                    and isinstance(n.value, ast.Name) and n.value.id in aliases):
                offenders.append(f"{name} uses {n.value.id}.{n.attr}")
    assert offenders == []


def test_help_imports_nothing_heavy():
    """`featstore --help` loads click and the light choices module, not torch, zarr or transformers."""
    code = ("import sys\nfrom featstore.command import cli\n"
            "print(sorted(m for m in ('torch', 'zarr', 'numpy', 'transformers', 'PIL', 'pandas', 'datasets') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


if __name__ == "__main__":
    found = cycles(graph())
    print("\n".join(" -> ".join(c) for c in found) or "no import cycles")
