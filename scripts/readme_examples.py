"""Run the README's worked example and write its real output back into the README.

    .venv/bin/python -m scripts.readme_examples            # run, print, compare with the README
    .venv/bin/python -m scripts.readme_examples --write    # and replace the example block with what it printed

The block between `<!-- example:start -->` and `<!-- example:end -->` is the source of truth for the commands: every
`$ .venv/bin/python -m steer_core ...` line (with `\\` continuations) runs here, in order, from the repo root, and its
output replaces the lines that followed it. So the README shows what the CLI prints today, never a hand edit.
tests/test_readme.py keeps each command parseable by the CLI's own parser. Not run in CI (a few minutes of CPU).
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- example:start -->", "<!-- example:end -->"
PROMPT = "$ "


def commands(block: str) -> list[str]:
    """The `$ ` commands of a block, continuations joined, in order."""
    out, current = [], None
    for line in block.splitlines():
        if current is not None:
            current += " " + line.strip()
        elif line.startswith(PROMPT):
            current = line[len(PROMPT) :].strip()
        if current is not None and not current.endswith("\\"):
            out.append(current)
            current = None
        elif current is not None:
            current = current[:-1].rstrip()
    return out


def example_block(readme: str) -> str:
    match = re.search(re.escape(START) + r"\n```\n(.*?)```\n" + re.escape(END), readme, re.S)
    if not match:
        raise SystemExit(f"README.md has no {START} ... {END} block with one code fence inside")
    return match.group(1)


def display(command: str, width: int = 110) -> str:
    """`$ command`, wrapped with `\\` continuations as the README writes it."""
    words, lines, line = shlex.split(command), [], PROMPT.rstrip()
    for word in words:
        piece = shlex.quote(word)
        if len(line) + 1 + len(piece) > width and line.strip() != "$":
            lines.append(line + " \\")
            line = "     "
        line += " " + piece
    return "\n".join([*lines, line])


def run(command: str) -> str:
    argv = shlex.split(command)
    if argv[:3] != [".venv/bin/python", "-m", "steer_core"]:
        raise SystemExit(f"the example runs steer_core commands only, not: {command}")
    done = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{command}\nfailed ({done.returncode}):\n{done.stderr}")
    return done.stdout.rstrip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="replace the README's example block with this run's output")
    args = p.parse_args()
    path = ROOT / "README.md"
    readme = path.read_text()
    block = example_block(readme)
    parts = []
    for command in commands(block):
        output = run(command)
        parts.append(display(command) + ("\n" + output if output else ""))
        print(parts[-1], flush=True)
    new_block = "\n".join(parts) + "\n"
    if new_block == block:
        print("the README's example is up to date")
    elif args.write:
        path.write_text(readme.replace(block, new_block, 1))
        print("wrote README.md")
    else:
        print("the README's example differs from this run; --write replaces it", file=sys.stderr)


if __name__ == "__main__":
    main()
