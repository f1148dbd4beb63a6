"""Every `fiqa` example in README.md and docs/ names a real command, and each option it uses is in that
command's `--help`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flows.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_EXAMPLE = re.compile(r"(?:`|^\s*)(fiqa [a-z][a-z-]*(?: [^`\n#]*)?)", re.M)


def _examples() -> list[tuple[str, str, list[str]]]:
    """(doc name, command, --options) of every `fiqa COMMAND ...` example in the docs."""
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in _EXAMPLE.finditer(text):
            words = m.group(1).split()
            if words[1] not in COMMANDS:
                continue
            opts = sorted({w.split("=")[0] for w in re.findall(r"--[a-z][a-z0-9-]*", m.group(1))})
            found.append((doc.name, words[1], opts))
    return found


EXAMPLES = _examples()
SUB_COMMANDS = {"deploy": ("serve", "register", "worker", "recover", "commands")}


def test_the_docs_have_examples_of_most_commands():
    assert len({cmd for _, cmd, _ in EXAMPLES}) >= 10


@pytest.mark.parametrize("command", sorted({cmd for _, cmd, _ in EXAMPLES}))
def test_every_documented_option_is_in_the_commands_help(command, capsys):
    help_text = ""
    for argv in ([command], *([command, action] for action in SUB_COMMANDS.get(command, ()))):
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--help"])
        assert exc.value.code == 0
        help_text += capsys.readouterr().out
    used = {(doc, opt) for doc, cmd, opts in EXAMPLES if cmd == command for opt in opts}
    missing = sorted((doc, opt) for doc, opt in used if opt not in ("--help",) and opt not in help_text)
    assert not missing, f"documented but not in `fiqa {command} --help`: {missing}"
