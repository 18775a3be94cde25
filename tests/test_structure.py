"""The code's own rules, checked on its source (issue 16 item 4): no module reaches another module's private names.

A name with a leading underscore is the module's own business; when another module (or a test, or a script) needs
it, it is made public or moved where it belongs. This reads the source with `ast`, so it runs in milliseconds.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OWN_MODULES = ("longctx", "micro", "reference", "standins", "conftest", "fault_train")  # tests/ helpers too


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def absolute(node: ast.ImportFrom, path: Path) -> str:
    """The module an import names, relative imports resolved against the file's package."""
    if not node.level:
        return node.module or ""
    package = list(path.relative_to(ROOT).parent.parts)
    package = package[:len(package) - node.level + 1]
    return ".".join(package + ([node.module] if node.module else []))


def cross_module_private_uses(path: Path, source: str | None = None) -> list[str]:
    """`from longctx.x import _y`, `x._y` on an imported project module, and `setattr(x, "_y", ...)` (monkeypatch)."""
    tree = ast.parse(path.read_text(encoding="utf-8") if source is None else source)
    where = lambda node: f"{path.relative_to(ROOT)}:{node.lineno}"  # noqa: E731
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and absolute(node, path).split(".")[0] in OWN_MODULES:
            found += [f"{where(node)}: imports {a.name}" for a in node.names if private(a.name)]
            modules |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            modules |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] in OWN_MODULES}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in modules:
                found.append(f"{where(node)}: {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "setattr":
            target, name = (node.args + [None, None])[:2]
            if isinstance(target, ast.Name) and target.id in modules and isinstance(name, ast.Constant):
                name = name.value                          # setattr(module, "_y", ...)
            elif isinstance(target, ast.Constant) and str(target.value).split(".")[0] in OWN_MODULES:
                name = target.value                        # setattr("longctx.x._y", ...)
            if isinstance(name, str) and private(name.rpartition(".")[2]):
                found.append(f"{where(node)}: {ast.unparse(node.func)}(... {name!r} ...)")
    return found


def python_files() -> list[Path]:
    return sorted(p for d in ("longctx", "tests", "scripts") for p in (ROOT / d).rglob("*.py")) + [ROOT / "train.py"]


def test_no_private_names_across_modules():
    found = [line for path in python_files() for line in cross_module_private_uses(path)]
    assert not found, "private names used across modules (make them public or move them):\n" + "\n".join(found)


def test_the_check_finds_each_kind():
    """The check itself, on a source with one use of each kind (so the test above cannot pass by finding nothing)."""
    source = ("from longctx.config import _x, ok\nfrom .rope import _r\nfrom longctx import evaluate\nimport micro\n"
              "evaluate._y\nmicro.tiny._z\nmonkeypatch.setattr(evaluate, '_w', 1)\n"
              "monkeypatch.setattr('longctx.evaluate._v', 1)\nevaluate.ok\nother._fine\nevaluate.__name__\nsetattr(self, '_own', 1)\n")
    found = cross_module_private_uses(ROOT / "longctx" / "probe.py", source)
    assert [line.split(": ", 1)[1] for line in found] == [
        "imports _x", "imports _r", "evaluate._y", "micro.tiny._z", "monkeypatch.setattr(... '_w' ...)",
        "monkeypatch.setattr(... 'longctx.evaluate._v' ...)"]


def test_design_note_citations_resolve():
    """Every `docs/design.md §N` or `§N.M` the code, tests, scripts or README cite is a heading there, and nothing
    cites design notes outside the repository (issue 16 item 7)."""
    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", (ROOT / "docs" / "design.md").read_text(), re.M))
    cited, outside = set(), []
    for path in python_files() + [ROOT / "README.md", *sorted((ROOT / "scripts").glob("*.sh"))]:
        text = path.read_text(encoding="utf-8")
        for ref in re.findall(r"docs/design\.md §(\d+(?:\.\d+)?(?:-\d+)?)", text):
            first, _, last = ref.partition("-")
            cited |= {first} | ({last} if last else set())
        outside += [f"{path.relative_to(ROOT)}: {m}" for m in re.findall(r"research/\w+\.md|(?<!docs/)DESIGN\.md", text)]
    assert cited and cited <= headings, sorted(cited - headings)
    assert not outside, outside
