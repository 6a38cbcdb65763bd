"""Real English text that every Python install carries, for benchmarks that need held-out prose.

Documents: the docstrings of each standard-library module (parsed with `ast`, nothing imported), one
document per module file, and the language reference's topics that `pydoc` ships (`pydoc_data.topics`),
one document per topic. About 2.2 MB on CPython 3.11. One document in ten (by sorted name) is held out:
`train.jsonl` and `heldout.jsonl` ({"text": ...}), written once and reused.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path

SKIP = {"test", "tests", "idle_test", "site-packages", "lib2to3"}  # test suites: code and fixtures, not prose


def documents() -> list[tuple[str, str]]:
    """(name, text) for every stdlib module with docstrings and every pydoc topic, sorted by name."""
    import pydoc_data.topics

    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        if SKIP & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        text = "\n\n".join(filter(None, (ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, kinds))))
        if text.strip():
            docs.append((f"stdlib/{path.relative_to(root)}", text))
    docs += [(f"topics/{name}", text) for name, text in pydoc_data.topics.topics.items()]
    return sorted(docs)


def make_split(folder: str | Path) -> tuple[Path, Path]:
    """train.jsonl and heldout.jsonl in `folder` (made once): every tenth document is held out."""
    folder = Path(folder)
    train, held = folder / "train.jsonl", folder / "heldout.jsonl"
    if train.exists() and held.exists():
        return train, held
    if train.exists() or held.exists():  # not a split this script wrote whole: never overwritten
        raise SystemExit(f"{folder}: holds only one of train.jsonl and heldout.jsonl; use another --work folder")
    folder.mkdir(parents=True, exist_ok=True)
    docs = documents()
    for path, part in ((train, [d for i, d in enumerate(docs) if i % 10]), (held, docs[::10])):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"name": n, "text": t}, ensure_ascii=False) + "\n" for n, t in part),
                       encoding="utf-8")
        tmp.rename(path)
    return train, held
