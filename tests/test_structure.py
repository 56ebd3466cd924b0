"""The package's shape, checked on its source: wings in the order data flows, no import circle,
who may import whom, module and function sizes, and where renames live (docs/architecture.md).

The import graph is computed over every module of the package, recursively, from every import
statement (those inside functions included).
"""

import ast
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dcmtune"

# The order of the wings: a module may import only its own wing's modules and those of wings
# of a lower rank. qm and model share a rank (neither imports the other); so do sweep and predict.
RANKS = {
    "kit": 0,
    "data": 1,
    "qm": 2,
    "model": 2,
    "train": 3,
    "analysis": 4,
    "sweep": 5,
    "predict": 5,
}
# Entry-point and import-alias shims (docs/architecture.md): exempt from the order, imported by
# nothing. `python -m dcmtune.rank` and the module paths that Tune pickled into experiments
# written before the subpackages.
SHIMS = {"dcmtune.rank", "dcmtune._tune_ext", "dcmtune._tune_loggers", "dcmtune.trainable"}
# Third-party packages that belong to one layer.
RAY_WINGS = {"sweep"}  # no Ray below the sweep
JAX_MODEL = ("jax", "jaxlib", "flax", "optax", "e3x")  # data and qm hold no JAX model code
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60
LONG_FUNCTIONS_ALLOWED = {("dcmtune.model.dcmnet", "DCMNet.__call__")}  # numbered physics steps


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    """{dotted module name: file} of every module of the package, recursively."""
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def wing(name: str) -> str:
    """The wing of a module: its subpackage, or "kit" for the top-level modules."""
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in RANKS) else "kit"


def imports(path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported name, line) of every import in the file, functions included: a package module
    when the import names one, else the (third-party or package) module imported from."""
    out = []
    for n in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(n, ast.Import):
            out += [(a.name, n.lineno) for a in n.names]
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            names = [f"{n.module}.{a.name}" for a in n.names]
            submodules = [m for m in names if m in known]
            out += [(m, n.lineno) for m in submodules]
            if len(submodules) < len(names):
                out.append((n.module, n.lineno))
    return out


def import_graph(root: Path = PACKAGE) -> dict[str, dict[str, int]]:
    """{module: {package module it imports: line}}."""
    mods = modules(root)
    known = set(mods)
    graph: dict[str, dict[str, int]] = {}
    for name, path in mods.items():
        edges: dict[str, int] = {}
        for target, line in imports(path, known):
            # `import a.b.c` also imports a and a.b; the named module is the edge.
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != name and target.startswith(root.name):
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
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


def violations(root: Path = PACKAGE) -> list[str]:
    """Every import against the folder rules, one line each (empty when the house is in order)."""
    graph, mods = import_graph(root), modules(root)
    known = set(mods)
    shims = {s.replace("dcmtune", root.name, 1) for s in SHIMS}
    out = []
    for name, edges in graph.items():
        w, is_main = wing(name), name.endswith(".__main__")
        for target, line in edges.items():
            if target in shims:
                out.append(f"{name}:{line} imports the shim {target}")
            if name in shims or is_main:
                continue  # commands cross the order here and nowhere else
            v = wing(target)
            if v != w and not RANKS[v] < RANKS[w]:
                out.append(f"{name}:{line} ({w}) imports {target} ({v}): against the wing order")
            face = target == f"{root.name}.{w}" and w != "kit"
            if face and not name.endswith("__init__") and name.count(".") > 1:
                out.append(f"{name}:{line} imports its own wing's face {target}")
        for target, line in imports(mods[name], known):
            top = target.split(".")[0]
            if top == "ray" and w not in RAY_WINGS and name not in shims:
                out.append(f"{name}:{line} ({w}) imports Ray: no Ray below the sweep")
            if top in JAX_MODEL and w in ("data", "qm"):
                out.append(f"{name}:{line} ({w}) imports {target}: no JAX model code in {w}")
    out += [f"circle: {' -> '.join(c)}" for c in circles(graph)]
    return out


# --------------------------------------------------------------------------- the rules


def test_every_module_sits_in_a_wing_or_the_kit():
    kit = {n for n in modules() if wing(n) == "kit"}
    assert (
        kit
        == {
            "dcmtune",
            "dcmtune.cli",
            "dcmtune.config",
            "dcmtune.metrics",
            "dcmtune.units",
            "dcmtune.storage",
            "dcmtune.provenance",
            "dcmtune._io",
            "dcmtune._yaml",
            "dcmtune.datasets",
            "dcmtune.models",
        }
        | SHIMS
    )
    assert {wing(n) for n in modules()} == set(RANKS)


def test_no_import_circle_and_no_import_against_the_wing_order():
    assert violations() == []


def test_the_kit_imports_no_wing():
    graph = import_graph()
    for name in modules():
        if wing(name) == "kit" and name not in SHIMS and name != "dcmtune":
            assert not [t for t in graph[name] if wing(t) != "kit"], name


def test_the_checks_catch_a_circle_and_a_forbidden_import(tmp_path):
    # A miniature package with one circle (kit a <-> kit b), a kit module importing a wing, a
    # data module importing the trainer and JAX, and a train module importing Ray.
    root = tmp_path / "dcmtune"
    files = {
        "__init__.py": "",
        "a.py": "from dcmtune import b\n",
        "b.py": "def f():\n    from dcmtune import a\n",
        "config.py": "from dcmtune.data import load\n",
        "data/__init__.py": "",
        "data/load.py": "import jax\nfrom dcmtune.train.loop import fit\n",
        "train/__init__.py": "",
        "train/loop.py": "def fit():\n    import ray\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text))
    found = "\n".join(violations(root))
    assert "circle: dcmtune.a -> dcmtune.b" in found
    assert "dcmtune.config:1 (kit) imports dcmtune.data.load (data)" in found
    assert "dcmtune.data.load:2 (data) imports dcmtune.train.loop (train)" in found
    assert "dcmtune.data.load:1 (data) imports jax" in found
    assert "dcmtune.train.loop:2 (train) imports Ray" in found


def test_shims_are_thin_and_imported_by_nothing():
    graph = import_graph()
    for name in SHIMS:
        path = modules()[name]
        assert len(path.read_text().splitlines()) <= 20, name
        assert not [m for m, edges in graph.items() if name in edges], name


def test_the_model_never_imports_the_trainer_and_the_trainer_never_imports_ray():
    graph = import_graph()
    for name, edges in graph.items():
        if wing(name) == "model":
            assert not [t for t in edges if wing(t) in ("train", "analysis", "sweep")], name


# --------------------------------------------------------------------------- sizes


def _functions(tree: ast.Module):
    """(qualified name, lines) of every function, methods as Class.method."""

    def walk(node, prefix):
        for n in ast.iter_child_nodes(node):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{prefix}{n.name}", n.end_lineno - n.lineno + 1
                yield from walk(n, f"{prefix}{n.name}.")
            elif isinstance(n, ast.ClassDef):
                yield from walk(n, f"{prefix}{n.name}.")

    yield from walk(tree, "")


def test_no_module_above_600_lines_and_no_function_above_60():
    sizes = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    assert max(sizes.values()) <= MAX_MODULE_LINES, {
        n: s for n, s in sizes.items() if s > MAX_MODULE_LINES
    }
    long = [
        (n, f, lines)
        for n, p in modules().items()
        for f, lines in _functions(ast.parse(p.read_text()))
        if lines > MAX_FUNCTION_LINES and (n, f) not in LONG_FUNCTIONS_ALLOWED
    ]
    assert long == []


# --------------------------------------------------------------------------- renames


def _renames(tree: ast.Module) -> list[int]:
    """Lines of os.replace/os.rename/shutil.move calls and Path-style .rename(x)/.replace(x)
    (one positional argument, no keywords: not str.replace nor dataclasses.replace)."""
    lines = []
    for n in ast.walk(tree):
        if not (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)):
            continue
        f = n.func
        owner = f.value.id if isinstance(f.value, ast.Name) else None
        if owner in ("os", "shutil") and f.attr in ("replace", "rename", "renames", "move"):
            lines.append(n.lineno)
        elif f.attr == "rename":
            lines.append(n.lineno)
        elif (
            f.attr == "replace"
            and len(n.args) == 1
            and not n.keywords
            and owner not in ("dataclasses",)
        ):
            lines.append(n.lineno)
    return lines


@pytest.mark.parametrize("name", sorted(modules()))
def test_renames_only_in_io(name):
    lines = _renames(ast.parse(modules()[name].read_text()))
    if name == "dcmtune._io":
        assert lines, "the atomic writer must rename"
    else:
        assert not lines, f"{name}: renames at lines {lines}; use dcmtune._io"


def test_rename_detector_sees_path_replace():
    src = "from pathlib import Path\np = Path('a')\np.replace(Path('b'))\n'x'.replace('a', 'b')\n"
    assert _renames(ast.parse(src)) == [3]
