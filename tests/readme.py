"""The README's runnable parts: its two set-up commands and its Python blocks.

CI (``.ci/run``) runs the test command it finds here, and the tests run the
demo command and the Python blocks, so the README cannot drift from the code.
Standard library only: ``.ci/run`` calls it before any environment exists.

Examples:
    python tests/readme.py test    # prints the README's test command
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.DOTALL | re.MULTILINE)


def blocks(language: str, text: str | None = None) -> list[str]:
    """The README's fenced code blocks in ``language``, in order."""
    text = README.read_text() if text is None else text
    return [body for lang, body in _BLOCK.findall(text) if lang == language]


def setup_commands(text: str | None = None) -> dict[str, str]:
    """The two set-up commands, ``demo`` and ``test``: the first two bash blocks."""
    commands = [b.strip() for b in blocks("bash", text)[:2]]
    by_role = {
        "demo": [c for c in commands if "laion-ray demo" in c],
        "test": [c for c in commands if "pytest" in c],
    }
    if any(len(found) != 1 for found in by_role.values()):
        raise ValueError(f"README.md must open with one demo and one test command, got {commands}")
    return {role: found[0] for role, found in by_role.items()}


if __name__ == "__main__":
    print(setup_commands()[sys.argv[1]])
