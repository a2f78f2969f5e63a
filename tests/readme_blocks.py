"""The README's code blocks, as tests/test_readme.py runs them.

A block runs when an HTML comment right above it says how::

    <!-- readme-test: notebook -->      the blocks of session "notebook", in order
    <!-- readme-test: skip (why) -->    shown to run, but not run here, and why

Blocks of one session run in order in one folder: ```python blocks in one IPython
shell (magics included; ``python tests/readme_blocks.py BLOCKS.json`` is that shell),
```bash blocks each in bash. A ```text block shows output or a synopsis and is never run.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

MARKER = re.compile(r"<!--\s*readme-test:\s*(?P<how>[^>]*?)\s*-->")
FENCE = re.compile(r"^```(?P<language>[A-Za-z]*)\s*$")
RUNNABLE = {"python", "bash"}


@dataclass(frozen=True)
class Block:
    """One fenced block: its language, its marker (``None`` if it has none), its first line."""

    language: str
    how: str | None
    code: str
    line: int

    @property
    def session(self) -> str | None:
        """The session it runs in; None for a skipped or unmarked block."""
        return None if self.how is None or self.how.startswith("skip") else self.how


def blocks(text: str) -> list[Block]:
    """Every fenced block of a Markdown text, with the marker right above it."""
    found: list[Block] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        fence = FENCE.match(lines[index])
        if fence is None:
            index += 1
            continue
        above = next((line for line in reversed(lines[:index]) if line.strip()), "")
        marker = MARKER.search(above)
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        found.append(Block(fence.group("language"), marker.group("how") if marker else None,
                           "\n".join(lines[index + 1:end]) + "\n", index + 2))
        index = end + 1
    return found


def run_in_ipython(session: list[dict]) -> int:
    """Run the blocks one after another as cells of one IPython shell; 1 at the first that fails."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    for block in session:
        print(f"--- README line {block['line']}", flush=True)
        result = shell.run_cell(block["code"], store_history=True)
        if not result.success:
            print(f"--- README line {block['line']}: FAILED", flush=True)
            return 1
    return 0


def write_session(session: list[Block], path: Path) -> Path:
    """Write a session's blocks for ``python tests/readme_blocks.py PATH``."""
    path.write_text(json.dumps([asdict(block) for block in session]))
    return path


if __name__ == "__main__":
    sys.exit(run_in_ipython(json.loads(Path(sys.argv[1]).read_text())))
