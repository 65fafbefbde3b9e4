"""No megaphi module uses an underscore-prefixed name of another megaphi package.

A package (megaphi.data, megaphi.parallel, ...; a top-level module such as megaphi.tokenizer is its own)
may use its own private helpers anywhere inside itself; across packages only public names are an API.
Read with ast, not imported: imports of private modules or names (absolute or relative) and attribute
access on an imported megaphi module are checked; attributes of objects (``obj._x``) need types and are
not. The compiled extensions megaphi._C and megaphi._cuda are the build's own names (as torch._C)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "megaphi"
EXTENSIONS = {"_C", "_cuda"}


def module_name(path, root):
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(dotted, root):
    base = root.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def owner(dotted):
    """The package that owns a module: megaphi.X for everything under megaphi/X/ or megaphi/X.py."""
    parts = dotted.split(".")
    return ".".join(parts[:2])


def is_private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__")) and name not in EXTENSIONS


def private_uses(dotted, importer, root):
    """(owning module, private name) for the first private component of a megaphi dotted path."""
    parts = dotted.split(".")
    if parts[0] != "megaphi":
        return None
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if not is_module(prefix, root):
            return None  # past the modules: an attribute of an object, not checked
        if is_private(parts[i]) and owner(prefix + "." + parts[i]) != owner(importer):
            return prefix, parts[i]
    return None


def dotted_of(node, bound):
    """`a.b.c` as a megaphi dotted path through the import-bound name `a`, else None."""
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in bound:
        return None
    return ".".join([bound[node.id]] + attrs[::-1])


def violations_in(path, root=ROOT):
    importer = module_name(path, root)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    found, bound = [], {}

    def check(dotted, line):
        hit = private_uses(dotted, importer, root)
        if hit:
            found.append(f"{path.relative_to(root)}:{line}: {hit[1]} of {hit[0]}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                check(alias.name, node.lineno)
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    bound[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                here = importer.split(".") if is_package else importer.split(".")[:-1]
                base = here[: len(here) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                check(f"{source}.{alias.name}", node.lineno)
                if is_module(f"{source}.{alias.name}", root):
                    bound[alias.asname or alias.name] = f"{source}.{alias.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            dotted = dotted_of(node, bound)
            if dotted:
                check(dotted, node.lineno)
    return sorted(set(found))


def test_no_private_name_crosses_a_package():
    found = [v for path in sorted(PACKAGE.rglob("*.py")) for v in violations_in(path)]
    assert not found, "private names used from another package (give them a public name):\n" + "\n".join(found)


def test_the_check_sees_each_form(tmp_path):
    """The forms the check must catch, on a small package laid out like megaphi."""
    pkg = tmp_path / "megaphi"
    for sub in ("a", "b"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "_impl.py").write_text("def _helper(): pass\n")
    (pkg / "a" / "api.py").write_text("def _hidden(): pass\n")
    (pkg / "a" / "inside.py").write_text("from ._impl import _helper\nfrom . import api\napi._hidden()\n")
    (pkg / "b" / "user.py").write_text(
        "from megaphi.a import _impl\n"
        "from ..a.api import _hidden\n"
        "import megaphi.a.api as api\n"
        "api._hidden()\n"
        "from megaphi import _C\n"
        "api.__name__\n"
    )
    assert violations_in(pkg / "a" / "inside.py", tmp_path) == []
    assert violations_in(pkg / "b" / "user.py", tmp_path) == [
        "megaphi/b/user.py:1: _impl of megaphi.a",
        "megaphi/b/user.py:2: _hidden of megaphi.a.api",
        "megaphi/b/user.py:4: _hidden of megaphi.a.api",
    ]
