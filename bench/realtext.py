"""Real English text that every chatforge install carries, for benchmarks that need held-out prose.

Documents: the docstrings of each module file (parsed with `ast`, nothing imported) of the standard
library and of the packages chatforge installs (PACKAGES), one document per module file, and the language
reference's topics that `pydoc` ships (`pydoc_data.topics`), one document per topic. Paragraphs repeated
anywhere in the corpus (transformers copies its argument docs from model to model) are kept once, at
their first document by sorted name, so no held-out paragraph was trained on verbatim. About 26 MB with
CPython 3.11, torch 2.13 and transformers 5.24 (other versions give a somewhat different corpus). One
document in ten (by sorted name) is held out: `train.jsonl` and `heldout.jsonl` ({"name": ..., "text": ...}),
written once and reused.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import sysconfig
from pathlib import Path

PACKAGES = ("torch", "transformers", "datasets", "huggingface_hub", "accelerate", "trl", "peft", "numpy",
            "pandas", "sympy", "networkx", "matplotlib")
SKIP = {"test", "tests", "testing", "idle_test", "site-packages", "lib2to3"}  # test suites: code and fixtures
DOCSTRING_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def docstrings(prefix: str, root: Path) -> list[tuple[str, str]]:
    """(prefix/relative path, its docstrings joined) for every .py file under `root` outside SKIP."""
    docs = []
    for path in sorted(root.rglob("*.py")):
        if SKIP & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        text = "\n\n".join(filter(None, (ast.get_docstring(n) for n in ast.walk(tree)
                                         if isinstance(n, DOCSTRING_OWNERS))))
        if text.strip():
            docs.append((f"{prefix}/{path.relative_to(root)}", text))
    return docs


def documents(packages=PACKAGES) -> list[tuple[str, str]]:
    """(name, text) for the stdlib, `packages` (those installed) and pydoc's topics, sorted by name, every
    paragraph once."""
    import pydoc_data.topics

    docs = docstrings("stdlib", Path(sysconfig.get_paths()["stdlib"]))
    for package in packages:
        spec = importlib.util.find_spec(package)  # finds the folder without importing the package
        if spec and spec.submodule_search_locations:
            docs += docstrings(package, Path(next(iter(spec.submodule_search_locations))))
    docs += [(f"topics/{name}", text) for name, text in pydoc_data.topics.topics.items()]
    seen, unique = set(), []
    for name, text in sorted(docs):
        kept = []
        for paragraph in filter(str.strip, text.split("\n\n")):
            key = hashlib.blake2b(paragraph.strip().encode(), digest_size=16).digest()
            if key not in seen:
                seen.add(key)
                kept.append(paragraph)
        if kept:
            unique.append((name, "\n\n".join(kept)))
    return unique


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
