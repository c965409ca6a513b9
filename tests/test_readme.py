"""The README and docs/ cannot drift from the CLI: every `$ ... -m steer_core` command they show still parses."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from scripts.readme_examples import commands, example_block
from steer_core.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PREFIX = [".venv/bin/python", "-m", "steer_core"]


def shown_commands() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for command in commands(page.read_text()):
            if shlex.split(command)[:3] == PREFIX:
                found.append((page.name, command))
    return found


def test_pages_show_commands():
    pages = {page for page, _ in shown_commands()}
    assert "README.md" in pages and len(shown_commands()) >= 10, pages


@pytest.mark.parametrize(("page", "command"), shown_commands(), ids=lambda v: v if v.endswith(".md") else "")
def test_command_parses(page, command):
    build_parser().parse_args(shlex.split(command)[len(PREFIX) :])


def test_readme_example_is_generated_by_the_script():
    block_commands = commands(example_block((ROOT / "README.md").read_text()))
    assert [shlex.split(c)[:3] for c in block_commands] == [PREFIX] * len(block_commands) and block_commands


def test_a_wrong_option_would_be_caught():
    with pytest.raises(SystemExit):
        build_parser().parse_args(shlex.split("export --feature 639 --strenght 0.5 --out x"))


def test_the_layout_names_every_module_where_it_is():
    """The README's layout table and steer_core/__init__.py name each module of the package, in its folder."""
    import re

    import steer_core

    package = ROOT / "steer_core"
    modules = {p.relative_to(package).with_suffix("") for p in package.rglob("*.py") if not p.name.startswith("__")}
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("Layout, in the order the data flows") :]
    rows = [(m.group(1), m.group(2)) for m in re.finditer(r"^\| (top|`\w+/`) \| ([^|]+) \|", table, re.M)]
    named = {(where.strip("`/") if where != "top" else "", name) for where, cell in rows
             for name in re.findall(r"`(\w+)`", cell)}  # fmt: skip
    doc = steer_core.__doc__ or ""
    for module in modules:
        folder, name = (module.parts[0], module.parts[1]) if len(module.parts) == 2 else ("", module.parts[0])
        assert (folder, name) in named, f"README's layout does not name {module}"
        assert f"`{name}`" in doc, f"steer_core/__init__.py does not name {module}"
