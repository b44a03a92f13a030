"""Every `declora run` and `declora compare` command the README and docs/ show (in code blocks and inline)
names real config files and keys with valid values: a renamed key or a tightened check cannot leave the
documentation behind. Nothing runs; each command's config is only loaded and validated."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from declora.cli import parse_cli
from declora.compare import expand, load_grid
from declora.config import load_config

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(
    r"(?:^|\s|`)(?:python3? -m declora|declora|torchrun .*?-m declora) (run|compare) ([^`#]*)"
)
# Shown on purpose but not runnable here: placeholders, a GPU this machine lacks, shell variables.
SKIP = re.compile(r"\[CONFIG\]|RUN_DIR|GRID|=S\b|\bS=|device=cuda|\$|--resume|\.\.\.")


def _code_lines(text: str) -> list[str]:
    """The lines of the fenced shell blocks (continuations joined), and the inline `declora ...` spans."""
    lines, block = [], None
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if block is None:
                block = (
                    [] if line.strip() in ("```", "```bash", "```sh", "```shell", "```console") else "other"
                )
            else:
                if block != "other":
                    lines += re.sub(r"\\\n\s*", " ", "\n".join(block)).splitlines()
                block = None
        elif block is not None and block != "other":
            block.append(line)
    lines += re.findall(r"`(declora (?:run|compare) [^`]*)`", text)
    return lines


def _commands() -> list[tuple[str, str, str]]:
    found = []
    for doc in DOCS:
        for line in _code_lines(doc.read_text()):
            m = COMMAND.search(line)
            if m and not SKIP.search(line):
                found.append((doc.name, m.group(1), m.group(2).strip()))
    return found


COMMANDS = _commands()


def test_the_docs_show_many_commands():
    assert len(COMMANDS) >= 60, len(COMMANDS)  # the extraction itself still finds them


@pytest.mark.parametrize(("doc", "verb", "rest"), COMMANDS, ids=[f"{d}:{r[:60]}" for d, _, r in COMMANDS])
def test_every_documented_command_loads_a_valid_config(doc, verb, rest, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # commands are written for the repository root
    args = parse_cli([verb, *shlex.split(rest)])
    if verb == "run":
        load_config(args.config, list(args.overrides))
    else:
        expand(load_grid(args.grid, tuple(args.overrides), str(tmp_path / "out")))
