"""The package's layers, and a walk over every import in it (module level and inside functions) that keeps them.

Bottom to top; a module may import its own layer and the ones below, never one above:

0. foundation   ``_io``, ``_plugins``, ``argtypes``, ``config``, ``dtypes``, ``norms``, ``numerics``, ``pooling``,
                ``shapes``, ``stats``: atomic writes and YAML reads, entry-point lookup, the CLI's argument types and
                path checks, the alignment config, dtype names, image normalisation constants, the CPU code paths a
                run pins and records, the poolings of teacher grids onto the student's, the generated scenes' shape
                masks, confidence intervals over seeds
1. OpenVLA      ``vla``: the only code that knows OpenVLA's layout, pixels, checkpoints and logits
   teachers     ``teachers``: the teacher registry (data), specs, weight lookup, one module per family
   (``vla`` and ``teachers`` are independent: neither imports the other)
2. core         ``losses``, ``projector``, ``hooks``, ``targets``, ``aligner``: what a training step computes, and
                where its targets come from (``targets``: a live teacher, the cache's store and keys, fixed targets)
3. integration  ``openvla``: the finetune.py plugin, its patch, merging, dataset registration
4. tools        ``cache`` (its builder), ``probe``, ``eval``, ``data``, ``tiny``: each stands alone (no tool imports
                another tool); ``tiny`` holds the tiny random-weight models the demo, the bench and the tests use
5. apps         ``cli``, ``bench``, ``demo``, the package root: compose the tools

Imports under ``if TYPE_CHECKING:`` are annotations only and are not counted. A string constant that names a package
module (``"openvla_align.eval.simpler:SimplerEnv"``, for ``importlib``) counts as an import of it. Test-only helpers
live under ``tests/``; no package module names them.
"""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "openvla_align"
LAYERS = (
    (
        "foundation",
        ("_io", "_plugins", "argtypes", "config", "dtypes", "norms", "numerics", "pooling", "shapes", "stats"),
    ),
    ("openvla+teachers", ("vla", "teachers")),
    ("core", ("losses", "projector", "hooks", "targets", "aligner")),
    ("integration", ("openvla",)),
    ("tools", ("cache", "probe", "eval", "data", "tiny")),
    ("apps", ("cli", "bench", "demo", "")),
)
NAMED_MODULE = re.compile(r"openvla_align((?:\.\w+)*)(?::\w+)?")
TEST_ONLY = ("conftest", "assets", "oft_assets", "_cpu_shim", "tests")
INDEPENDENT = {("vla", "teachers"), ("teachers", "vla")}
TOOLS = dict(LAYERS)["tools"]


def modules():
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _runtime_nodes(tree):
    """Every node except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imports():
    """{module: {imported module}} inside the package (``""`` is the package root)."""
    mods = modules()
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".") if package else []
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                elif (node.module or "").startswith("openvla_align"):
                    target = node.module[len("openvla_align") :].lstrip(".")
                else:
                    continue
                submodules = [f"{target}.{a.name}".lstrip(".") for a in node.names]
                found = [m for m in submodules if m in mods]
                edges.update(found or ([target] if target in mods else []))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("openvla_align"):
                        edges.add(alias.name[len("openvla_align") :].lstrip("."))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                # not the bare "openvla_align" (the distribution's name) nor an enclosing package's name (the
                # teachers' entry-point group "openvla_align.teachers" is spelled like their package)
                named = NAMED_MODULE.fullmatch(node.value)
                target = named.group(1).lstrip(".") if named else ""
                if target and target in mods and not name.startswith(target + "."):
                    edges.add(target)
        edges.discard(name)
        graph[name] = edges
    return graph


def place(module):
    """(layer index, unit) of a module: the longest listed prefix decides (``vla.checkpoint`` falls to ``vla``); ``""``
    is the package root alone. None for a module no unit covers."""
    best = None
    for index, (_, units) in enumerate(LAYERS):
        for unit in units:
            if module == unit or (unit and module.startswith(unit + ".")):
                if best is None or len(unit) > len(best[1]):
                    best = (index, unit)
    return best


def unplaced(names):
    return sorted(m for m in names if place(m) is None)


def test_every_module_has_a_layer():
    missing = unplaced(modules())
    assert not missing, f"modules in no layer (add them to LAYERS and this file's docstring): {missing}"
    assert place("targets.cache") == (2, "targets") and place("cache.build") == (4, "cache")
    assert place("vla.checkpoint") == (1, "vla") and place("") == (5, "")


def test_a_module_in_no_layer_fails_the_layer_test():
    """The test of the test: a new top-level module or package is not silently put in the top layer."""
    added = ["simulators", "simulators.libero", "helpers"]
    assert unplaced(list(modules()) + added) == sorted(added)
    assert place("eval.new_simulator") == (4, "eval")  # a new module inside a placed package takes its layer


def test_no_import_points_up_and_tools_stand_alone():
    bad = []
    for module, targets in imports().items():
        (layer, unit) = place(module)
        for target in targets:
            t_layer, t_unit = place(target)
            if t_layer > layer:
                bad.append(f"{module} -> {target} (up: {LAYERS[layer][0]} -> {LAYERS[t_layer][0]})")
            elif (unit, t_unit) in INDEPENDENT:
                bad.append(f"{module} -> {target} ({unit} and {t_unit} are independent)")
            elif unit in TOOLS and t_unit in TOOLS and unit != t_unit:
                bad.append(f"{module} -> {target} (one tool importing another)")
    assert not bad, "imports against the layering (see this file's docstring):\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = imports()
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_package_module_imports_test_helpers():
    """Test support lives under tests/ and only tests import it: no package module names it, by statement or string."""
    bad = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names = [node.value.partition(":")[0]] if NAMED_MODULE.fullmatch(node.value) else []
            else:
                continue
            bad += [
                f"{name}: {n}" for n in names if n.split(".")[0] in TEST_ONLY or n.startswith("openvla_align.testing")
            ]
    assert not bad, bad


def test_the_walk_sees_function_level_imports_and_named_modules():
    graph = imports()
    assert "vla.actions" in graph["eval.run"]  # imported inside a method
    assert "vla.pixels" in graph["targets"] and "targets" in graph["aligner"]
    # a module named by string (an importlib target) is an edge too: found in a tree built for the purpose
    assert NAMED_MODULE.fullmatch("openvla_align.eval.simpler:SimplerEnv").group(1) == ".eval.simpler"
    assert not NAMED_MODULE.fullmatch("see openvla_align.eval for the runner")
