"""The plan of the house: imports flow one way, and every module imports on its own.

The graph holds every ``import`` of a fedtune_core module by another, at module level and
inside functions alike: a deferred import that climbs back up is still a circle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fedtune_core"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """The fedtune_core modules that module ``name`` imports (anywhere in its body)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}".rstrip(".")
            # `from pkg import mod` imports the module pkg.mod when there is one
            subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES}
            found |= subs or {base}
    return {m for m in found if m in MODULES and m != name}


def _graph() -> dict[str, set[str]]:
    return {name: _imports(name, path) for name, path in MODULES.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [node])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found
    return None


def test_the_cycle_check_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    found = _cycle(graph)
    assert found is not None and found[0] == found[-1] and set(found) == {"a", "b", "c"}
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_sees_imports_inside_functions():
    graph = _graph()
    assert "fedtune_core.fl.builtin" in graph["fedtune_core.cli"]  # imported inside cmd_run
    assert "fedtune_core.tuning.registry" in graph["fedtune_core.tuning.bias"]


def test_no_module_of_fedtune_core_imports_one_that_imports_it_back():
    cycle = _cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_ground_floor_imports_nothing_of_ours():
    graph = _graph()
    assert graph["fedtune_core.errors"] == set()


# The house: a ground floor (the top-level modules and tuning/: what a run is, and the file
# primitives every room uses), then four rooms, each importing only the floors below it.
ROOMS = ("fl", "proxy", "runs", "study")  # lowest first; cli.py sits above them all


def floor(module: str) -> int:
    """0 for the ground floor, 1..4 for the rooms in :data:`ROOMS` order, 5 for the CLI."""
    parts = module.split(".")
    if parts[:2] == ["fedtune_core", "cli"]:
        return len(ROOMS) + 1
    if len(parts) > 1 and parts[1] in ROOMS:
        return ROOMS.index(parts[1]) + 1
    return 0


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module by one on a lower floor (``a -> b``), sorted."""
    return sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps
                  if floor(b) > floor(a))


def test_the_floors_are_those_of_the_plan():
    assert floor("fedtune_core.errors") == floor("fedtune_core.config") == 0
    assert floor("fedtune_core.tuning.lora") == 0
    assert [floor(f"fedtune_core.{r}.x") for r in ROOMS] == [1, 2, 3, 4]
    assert floor("fedtune_core.cli") == 5
    assert {floor(m) for m in MODULES} == set(range(len(ROOMS) + 2))  # every floor is used


def test_imports_only_go_down_the_house():
    """fl < proxy < runs < study < cli, over the ground floor, counting imports inside
    functions too: the federated core never reaches up into pre-training or the records."""
    assert upward(_graph()) == []


def test_the_layer_check_finds_a_planted_upward_import(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from fedtune_core.proxy import pretrain\n"
                       "    from fedtune_core.runs import store as s\n")
    found = _imports("fedtune_core.fl.planted", planted)
    assert found == {"fedtune_core.proxy.pretrain", "fedtune_core.runs.store"}
    graph = {name: set(deps) for name, deps in _graph().items()}
    graph["fedtune_core.fl.planted"] = found
    graph["fedtune_core.config"].add("fedtune_core.fl.fedavg")
    assert upward(graph) == ["fedtune_core.config -> fedtune_core.fl.fedavg",
                             "fedtune_core.fl.planted -> fedtune_core.proxy.pretrain",
                             "fedtune_core.fl.planted -> fedtune_core.runs.store"]


# One interpreter imports the third-party modules that importing all of ours loads (a forked
# scout tells which) and no module of ours, then forks one child per module of ours, which
# imports that module alone.
FORKED_IMPORTS = """
import importlib, json, os, sys, traceback
names = json.loads(sys.argv[1])


def forked(work):
    \"\"\"Run work() in a forked child; (its exit status, what it wrote to the pipe).\"\"\"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        code = 0
        try:
            out = work()
        except BaseException:
            out, code = traceback.format_exc(), 1
        os.write(write, out.encode())
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        out = pipe.read().decode(errors="replace")
    return os.waitpid(pid, 0)[1], out


def loaded_by_ours():
    before = set(sys.modules)
    for name in names:
        importlib.import_module(name)
    return json.dumps([m for m in sys.modules if m not in before
                       and m.partition(".")[0] != "fedtune_core"])


status, out = forked(loaded_by_ours)
assert status == 0, out
for module in json.loads(out):
    try:
        importlib.import_module(module)
    except Exception:  # an alias or a lazily made module: its importer makes it again
        pass
ours = [m for m in sys.modules if m.partition(".")[0] == "fedtune_core"]
assert not ours, ours
failures = {}
for name in names:
    status, err = forked(lambda: importlib.import_module(name) and "")
    if status:
        failures[name] = (err.strip().splitlines() or ["the child died"])[-1:]
print(json.dumps(failures))
"""


@pytest.mark.slow
def test_every_module_imports_first_in_a_fresh_interpreter():
    """Each module imported alone, before any other of ours: no order is needed.

    Each module is imported in a child forked from an interpreter that has imported no
    module of ours, only the third-party modules (torch, pandas, ...) that ours load: fresh
    as far as fedtune_core goes, without importing torch again for each module.
    """
    import json

    proc = subprocess.run([sys.executable, "-c", FORKED_IMPORTS, json.dumps(sorted(MODULES))],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failures, failures


@pytest.mark.slow
@pytest.mark.parametrize("order", ["sorted", "reversed"])
def test_all_modules_import_in_either_order(order):
    names = sorted(MODULES, reverse=order == "reversed")
    code = "; ".join(f"import {n}" for n in names)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
