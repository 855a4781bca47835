"""Real text that every machine has: the Python standard library's sources and docstrings.

Calibration, distillation and the benchmarks need representative text without downloading
anything. This module walks the standard library's `.py` files (tests excluded), and splits
them into train and validation *by file* with a stable hash, so held-out text never shares a
file with training text. It knows nothing of models or quantization.
"""

from __future__ import annotations

import ast
import functools
import inspect
import sysconfig
import zlib
from pathlib import Path
from typing import Literal

Split = Literal["train", "val", "all"]

#: One file in this many goes to the validation split.
VALIDATION_EVERY = 10
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@functools.lru_cache(maxsize=1)
def stdlib_files() -> tuple[Path, ...]:
    """The standard library's source files, sorted, excluding test suites and site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        path
        for path in root.rglob("*.py")
        if not _EXCLUDED_DIRS.intersection(path.relative_to(root).parts[:-1])
    ]
    if not files:
        raise RuntimeError(f"no standard-library sources found under {root}")
    return tuple(sorted(files))


def _in_split(path: Path, split: Split) -> bool:
    if split == "all":
        return True
    root = Path(sysconfig.get_paths()["stdlib"])
    is_val = zlib.crc32(str(path.relative_to(root)).encode()) % VALIDATION_EVERY == 0
    return is_val if split == "val" else not is_val


def _check_split(split: str) -> None:
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


@functools.lru_cache(maxsize=None)
def _file_docstrings(path: Path) -> tuple[str, ...]:
    source = _read(path)
    return tuple(_docstrings_of(source)) if source else ()


def _docstrings_of(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    nodes = [tree] + [
        node
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    ]
    texts = (ast.get_docstring(node, clean=False) for node in nodes)
    return [inspect.cleandoc(text) for text in texts if text]


def docstrings(
    split: Split = "all", *, min_chars: int = 40, max_chars: int = 1000, limit: int | None = None
) -> list[str]:
    """Docstrings of modules, classes and functions, whitespace-normalised and truncated."""
    _check_split(split)
    found: list[str] = []
    for path in stdlib_files():
        if not _in_split(path, split):
            continue
        for text in _file_docstrings(path):
            text = " ".join(text.split())[:max_chars]
            if len(text) >= min_chars:
                found.append(text)
                if limit is not None and len(found) >= limit:
                    return found
    return found


def source_text(split: Split = "all", *, max_chars: int | None = None) -> str:
    """The concatenated source files of one split (for character-level language models)."""
    _check_split(split)
    parts: list[str] = []
    total = 0
    for path in stdlib_files():
        if not _in_split(path, split):
            continue
        source = _read(path)
        if source is None:
            continue
        parts.append(source)
        total += len(source)
        if max_chars is not None and total >= max_chars:
            break
    text = "\n".join(parts)
    return text if max_chars is None else text[:max_chars]
