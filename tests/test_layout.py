"""The README's map of the code ("How the code is laid out") names every module, and only modules that exist,
so that the next module added or moved without its line in the map fails CI."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "routers", "workers", "kernels")
_COLUMN = re.compile(r"^( *)(\S.*?)(?: {2,}.*)?$")


def _layout_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## How the code is laid out"):]
    return section.split("```")[1].strip("\n").splitlines()


def _mapped() -> set[str]:
    """Every path the map names: each line's names column (before two spaces), entries separated by commas, a
    name ending in / opening a folder for the lines indented under it."""
    stack: list[tuple[int, str]] = []
    paths = set()
    for line in _layout_block():
        indent, names = _COLUMN.match(line).groups()
        depth = len(indent)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parent = "/".join(name for _, name in stack)
        for name in (n.strip() for n in names.split(",")):
            path = f"{parent}/{name}".strip("/") if parent else name
            paths.add(path.rstrip("/"))
            if name.endswith("/"):
                stack.append((depth, name.rstrip("/")))
    return paths


def _modules() -> set[str]:
    found = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if path.name not in ("__init__.py", "__main__.py") and "__pycache__" not in path.parts:
                found.add(str(path.relative_to(ROOT)))
    return found


def test_the_readme_map_names_every_module():
    missing = _modules() - _mapped()
    assert not missing, f"modules the README's layout does not name: {sorted(missing)}"


def test_the_readme_map_names_no_module_that_is_gone():
    named = {p for p in _mapped() if p.endswith(".py") and not p.endswith("__init__.py")}
    gone = {p for p in named if not (ROOT / p).exists()}
    assert not gone, f"the README's layout names modules that do not exist: {sorted(gone)}"
