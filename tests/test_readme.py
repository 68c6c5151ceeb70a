"""Every ```python block of README.md is a whole program that runs as written, and the planner output the
README shows is what the command prints.

Each python block is written to a file of its own and run by a fresh interpreter (``python block.py``, so
the multi-process examples' ``if __name__ == "__main__":`` guard and the "spawn" start method work as they
do for a reader), from an empty temporary directory, with a timeout.  Blocks that must not run (printed
output, shell commands) use another fence language on purpose: ```text, ```bash; a ```console block
that starts with ``$ pytrain plan`` or ``$ pytrain cost`` is rerun and its output compared.
"""
import shlex
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import List, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TIMEOUT_S = 300  # each block takes seconds on 2 idle cores; the margin is for a loaded CI machine

HEADING = re.compile(r"^#+ +(?P<title>.+)$")


class Block(NamedTuple):
    """One fenced block: where it starts (1-based line of the opening fence), its section, its text."""

    line: int
    section: str
    code: str


def fenced_blocks(text: str, language: str = "python") -> List[Block]:
    """The ```<language> blocks of a Markdown text (fences may be indented, inside list items), each
    dedented; ``section`` is the slug of the last heading outside any fence before it."""
    blocks, section, fence, body = [], "top", None, []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if fence is None:
            if stripped.startswith("```"):
                fence, body = (number, stripped[3:].strip()), []
            elif HEADING.match(line):
                section = re.sub(r"[^a-z0-9]+", "-", HEADING.match(line).group("title").lower()).strip("-")
        elif stripped == "```":
            if fence[1] == language:
                blocks.append(Block(fence[0], section, textwrap.dedent("\n".join(body) + "\n")))
            fence = None
        else:
            body.append(line)
    return blocks


BLOCKS = fenced_blocks(README.read_text())
COMMANDS = [b for b in fenced_blocks(README.read_text(), "console")
            if b.code.startswith(("$ pytrain plan", "$ pytrain cost"))]


def test_fenced_blocks_finds_indented_blocks_and_skips_other_languages():
    text = ("# A\n```python\nx = 1\n```\n```text\nnot code\n```\n## B c\n- item:\n\n  ```python\n  y = 2\n"
            "  if y:\n      y = 3\n  ```\n```console\n$ ls\n```\n")
    assert fenced_blocks(text) == [Block(2, "a", "x = 1\n"), Block(11, "b-c", "y = 2\nif y:\n    y = 3\n")]


def test_readme_has_its_examples():
    assert len(BLOCKS) >= 10, f"README.md has {len(BLOCKS)} ```python blocks"
    assert any("--nodes 8" in b.code for b in COMMANDS), "README.md shows no planner output for 64 H100s"


@pytest.mark.parametrize("block", COMMANDS, ids=[f"{b.section}-line{b.line}" for b in COMMANDS])
def test_readme_planner_output_is_what_the_command_prints(block):
    command, _, shown = block.code.partition("\n")
    args = shlex.split(command)[2:]  # after "$ pytrain"
    proc = subprocess.run([sys.executable, "-m", "pytrain", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT_S, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip() == shown.rstrip(), (
        f"README.md line {block.line}: `{command[2:]}` prints something else now; paste its output:\n{proc.stdout}")


@pytest.mark.parametrize("block", BLOCKS, ids=[f"{b.section}-line{b.line}" for b in BLOCKS])
def test_readme_block_runs_as_written(block, tmp_path):
    script = tmp_path / f"readme_line{block.line}.py"
    script.write_text(block.code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"README.md line {block.line} ({block.section}) ran over {TIMEOUT_S} s:\n{exc.stderr}")
    assert proc.returncode == 0, (f"README.md line {block.line} ({block.section}) exited with {proc.returncode}:\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
