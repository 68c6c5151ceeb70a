"""Every ```python block of README.md is a whole program that runs as written.

Each block is written to a file of its own and run by a fresh interpreter (``python block.py``, so the
multi-process examples' ``if __name__ == "__main__":`` guard and the "spawn" start method work as they do
for a reader), from an empty temporary directory, with a timeout.  Blocks that must not run (printed
output, shell sessions) use another fence language on purpose: ```text, ```console, ```bash.
"""
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
    """One ```python block: where it starts (1-based line of the opening fence), its section, its code."""

    line: int
    section: str
    code: str


def python_blocks(text: str) -> List[Block]:
    """The ```python blocks of a Markdown text (fences may be indented, inside list items), each dedented;
    ``section`` is the slug of the last heading outside any fence before it."""
    blocks, section, fence, body = [], "top", None, []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if fence is None:
            if stripped.startswith("```"):
                fence, body = (number, stripped[3:].strip()), []
            elif HEADING.match(line):
                section = re.sub(r"[^a-z0-9]+", "-", HEADING.match(line).group("title").lower()).strip("-")
        elif stripped == "```":
            if fence[1] == "python":
                blocks.append(Block(fence[0], section, textwrap.dedent("\n".join(body) + "\n")))
            fence = None
        else:
            body.append(line)
    return blocks


BLOCKS = python_blocks(README.read_text())


def test_python_blocks_finds_indented_blocks_and_skips_other_languages():
    text = ("# A\n```python\nx = 1\n```\n```text\nnot code\n```\n## B c\n- item:\n\n  ```python\n  y = 2\n"
            "  if y:\n      y = 3\n  ```\n```console\n$ ls\n```\n")
    assert python_blocks(text) == [Block(2, "a", "x = 1\n"), Block(11, "b-c", "y = 2\nif y:\n    y = 3\n")]


def test_readme_has_its_examples():
    assert len(BLOCKS) >= 10, f"README.md has {len(BLOCKS)} ```python blocks"


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
