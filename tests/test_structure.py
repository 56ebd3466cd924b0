"""The package's shape, checked on its source: who may import whom, and where renames live."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dcmtune"
MODULES = sorted(PACKAGE.glob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imported_modules(node: ast.AST) -> set[str]:
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Import):
            out.update(a.name for a in n.names)
        elif isinstance(n, ast.ImportFrom) and n.module:
            out.add(n.module)
            if n.module == "dcmtune":
                out.update(f"dcmtune.{a.name}" for a in n.names)
    return out


def _main_block(tree: ast.Module):
    for n in tree.body:
        if (isinstance(n, ast.If) and isinstance(n.test, ast.Compare)
                and isinstance(n.test.left, ast.Name) and n.test.left.id == "__name__"):
            return n
    return None


def test_cli_kit_imports_no_dcmtune_module():
    imported = _imported_modules(_tree(PACKAGE / "cli.py"))
    assert not {m for m in imported if m.split(".")[0] == "dcmtune"}, imported


def test_only_train_main_block_imports_train_cli():
    for path in MODULES:
        if path.name == "train_cli.py":
            continue
        tree = _tree(path)
        main = _main_block(tree)
        in_main = _imported_modules(main) if main is not None else set()
        everywhere = _imported_modules(tree)
        outside = "dcmtune.train_cli" in everywhere and (
            "dcmtune.train_cli" not in in_main
            or sum(1 for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                   and n.module == "dcmtune.train_cli")
            > sum(1 for n in ast.walk(main) if isinstance(n, ast.ImportFrom)
                  and n.module == "dcmtune.train_cli"))
        assert not outside, f"{path.name} imports dcmtune.train_cli outside train.py's __main__"
        if "dcmtune.train_cli" in in_main:
            assert path.name == "train.py", path.name


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
        elif f.attr == "replace" and len(n.args) == 1 and not n.keywords and owner not in (
                "dataclasses",):
            lines.append(n.lineno)
    return lines


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_renames_only_in_io(path):
    lines = _renames(_tree(path))
    if path.name == "_io.py":
        assert lines, "the atomic writer must rename"
    else:
        assert not lines, f"{path.name}: renames at lines {lines}; use dcmtune._io"


def test_rename_detector_sees_path_replace(tmp_path):
    src = "from pathlib import Path\np = Path('a')\np.replace(Path('b'))\n'x'.replace('a', 'b')\n"
    assert _renames(ast.parse(src)) == [3]


def test_no_module_above_800_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in MODULES}
    assert max(sizes.values()) <= 800, sizes
