"""docs/cli.md documents the CLI as it is: every command has a section, every option and argument of a command is
in its section's option table, and every `--flag` a table documents exists on that command.

The CLI side is the click command tree of the typer app (no subprocess); the docs side is the markdown: a command's
section is the text from the heading that names it (`## \\`attncache bench codecs\\``) to the next heading of the
same or a higher level, and its documented options are the code spans in the first column of its tables."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from attncache_cli.main import app

CLI_MD = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
PROG = "attncache"

HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
COMMAND_IN_HEADING = re.compile(rf"`{PROG}((?: [a-z][a-z0-9-]*)*)")
CODE_SPAN = re.compile(r"`([^`]+)`")
FLAG = re.compile(r"--[A-Za-z0-9][A-Za-z0-9-]*")
ALWAYS_THERE = {"--help"}  # click adds it to every command; documenting it is harmless


# -- the CLI ---------------------------------------------------------------------------------------------------


def _walk(cmd, path: tuple[str, ...]):
    """(path, command, is_group) for the root, every group and every command, depth first."""
    is_group = hasattr(cmd, "commands")
    yield path, cmd, is_group
    if is_group:
        for name, sub in sorted(cmd.commands.items()):
            if not getattr(sub, "hidden", False):
                yield from _walk(sub, (*path, name))


def _params(cmd) -> tuple[list[str], list[str]]:
    """(option flags, argument names upper-cased) of a command, secondary flags (`--no-amp`) included."""
    flags, arguments = [], []
    for p in cmd.params:
        if getattr(p, "hidden", False):
            continue
        if p.param_type_name == "argument":
            arguments.append(p.name.upper())
        else:
            flags.extend(o for o in (*p.opts, *p.secondary_opts) if o.startswith("--"))
    return flags, arguments


ROOT = typer.main.get_command(app)
TREE = list(_walk(ROOT, (PROG,)))
COMMANDS = {" ".join(path): cmd for path, cmd, is_group in TREE if not is_group}
GROUPS = {" ".join(path): cmd for path, cmd, is_group in TREE if is_group}


# -- the docs --------------------------------------------------------------------------------------------------


def _headings(lines: list[str]) -> list[tuple[int, int, str]]:
    """(line index, level, title) of the markdown headings, none from inside fenced code blocks."""
    heads, fenced = [], False
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (m := HEADING.match(line)):
            heads.append((i, len(m.group(1)), m.group(2)))
    return heads


def _sections(text: str) -> tuple[str, dict[str, list[str]], dict[str, int]]:
    """(text before the first `##` heading, {command path: its section's lines}, {command path: headings naming
    it}) for the headings that name a command in a code span."""
    lines = text.splitlines()
    heads = _headings(lines)
    intro_end = next((i for i, level, _ in heads if level >= 2), len(lines))
    sections: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for n, (i, level, title) in enumerate(heads):
        m = COMMAND_IN_HEADING.search(title)
        if m is None:
            continue
        end = next((j for j, lvl, _ in heads[n + 1:] if lvl <= level), len(lines))
        path = PROG + m.group(1)
        counts[path] = counts.get(path, 0) + 1
        sections.setdefault(path, lines[i + 1:end])  # the first; test_every_command_has_one_section
    return "\n".join(lines[:intro_end]), sections, counts


def _table_first_cells(lines: list[str]) -> list[str]:
    """The first cell of every table row (header and `|---|` separator rows excluded)."""
    cells = []
    for line in lines:
        line = line.strip()
        if not line.startswith("|"):
            continue
        first = line.strip("|").split("|", 1)[0].strip()
        if not first or set(first) <= set("-: "):
            continue
        cells.append(first)
    return cells


def _documented(lines: list[str]) -> tuple[set[str], set[str]]:
    """(flags, other code-span words) written in code spans in the first column of the section's tables."""
    flags, words = set(), set()
    for cell in _table_first_cells(lines):
        for span in CODE_SPAN.findall(cell):
            flags.update(FLAG.findall(span))
            words.update(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", FLAG.sub(" ", span)))
    return flags, words


TEXT = CLI_MD.read_text(encoding="utf-8")
INTRO, SECTIONS, HEADING_COUNTS = _sections(TEXT)


# -- the tests -------------------------------------------------------------------------------------------------


def test_the_cli_tree_is_walked():
    """Guards the walk itself: if typer's objects changed shape, the checks below would pass vacuously."""
    assert {"attncache extract", "attncache train", "attncache bench codecs"} <= set(COMMANDS)
    assert "--batch-size" in _params(COMMANDS["attncache extract"])[0]
    assert "--no-amp" in _params(COMMANDS["attncache extract"])[0]
    assert _params(COMMANDS["attncache inspect"])[1] == ["CACHE"]


def test_every_command_has_one_section():
    problems = [f"no section (a heading naming `{c}`) for `{c}`" for c in COMMANDS if c not in SECTIONS]
    problems += [f"{n} headings name `{c}`" for c, n in HEADING_COUNTS.items() if n > 1]
    problems += [f"a section for `{c}`, a command the CLI does not have" for c in SECTIONS if c not in COMMANDS]
    assert not problems, f"{CLI_MD.name}: " + "; ".join(problems)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_is_documented(command):
    assert command in SECTIONS, f"{CLI_MD.name}: no section for `{command}`"
    flags, arguments = _params(COMMANDS[command])
    doc_flags, doc_words = _documented(SECTIONS[command])
    missing = [f for f in flags if f not in doc_flags] + [a for a in arguments if a not in doc_words]
    assert not missing, (f"{CLI_MD.name}, section `{command}`: not in its option table (first column, in "
                         f"backticks): {', '.join(missing)}")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_no_stale_option_is_documented(command):
    assert command in SECTIONS, f"{CLI_MD.name}: no section for `{command}`"
    flags, _ = _params(COMMANDS[command])
    doc_flags, _ = _documented(SECTIONS[command])
    stale = sorted(doc_flags - set(flags) - ALWAYS_THERE)
    assert not stale, (f"{CLI_MD.name}, section `{command}`: documents options `{command}` does not have: "
                       f"{', '.join(stale)}")


def test_group_options_are_in_the_intro():
    """Options of `attncache` itself (and of `attncache bench`), like `--version`, belong to the page's intro."""
    missing = [f"{group} {flag}" for group, cmd in GROUPS.items() for flag in _params(cmd)[0]
               if not re.search(rf"`[^`]*{re.escape(flag)}(?![A-Za-z0-9-])[^`]*`", INTRO)]
    assert not missing, f"{CLI_MD.name}: the intro (before the first `##`) does not mention: {', '.join(missing)}"
