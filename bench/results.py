"""What the benchmarks share: the CPU's name, and writing one section of bench/RESULTS.md.

Each benchmark owns the section between `<!-- NAME:begin -->` and `<!-- NAME:end -->`; a
rerun replaces it and leaves the rest of the file alone.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def cpu_model() -> str:
    """The CPU's model name (lscpu), or what `platform` knows."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def write_section(name: str, body: str) -> None:
    """Put `body` between the markers of section `name` of RESULTS.md (appended if absent)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    section = f"{begin}\n{body}\n{end}"
    current = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if begin in current:
        current = current[: current.index(begin)] + section + current[current.index(end) + len(end):]
    else:
        current = current.rstrip() + "\n\n" + section + "\n"
    RESULTS.write_text(current)
