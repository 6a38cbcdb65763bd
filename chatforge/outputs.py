"""Output folders that are provably chatforge's: what a command may replace, and how it writes.

A folder chatforge writes carries `chatforge_output.json` (the kind of output in it), or a shard
manifest. A command replaces only such a folder of its own kind, never a folder that holds any of its
inputs, never the working folder or one above it, and never a folder it did not write, `--overwrite`
or not: the user is told which folder and how to go on. New content is written to a temporary sibling
and renamed into place, so a killed command leaves the old content or the new, never a mix.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from chatforge.errors import ChatforgeError

OWNER = "chatforge_output.json"
CHECKPOINT_STARTED = "chatforge_started.json"   # in a checkpoint folder, before the Trainer writes into it
CHECKPOINT_COMPLETE = "chatforge_complete.json"  # after it wrote every file


def owner_kind(folder: str | Path) -> str | None:
    """The kind of output chatforge recorded in `folder`, or None if it did not write it."""
    try:
        return json.loads((Path(folder) / OWNER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def mark(folder: str | Path, kind: str) -> None:
    path = Path(folder) / OWNER
    tmp = path.with_name(OWNER + ".tmp")
    tmp.write_text(json.dumps({"kind": kind, "written_by": "chatforge"}))
    os.replace(tmp, path)


def check_not_inputs(out: str | Path, inputs: list[tuple[str, str | None]], keep: tuple[str, ...] = ()) -> None:
    """Refuse an output folder that is, or holds, one of the command's inputs, or the working folder.

    inputs: (option name, path) pairs (None or a non-path spec such as demo or hf:NAME is ignored);
    keep: sub-folders of `out` the command reuses rather than replaces (their inputs are fine)."""
    target = Path(out).resolve()
    if target == Path.cwd().resolve() or target in Path.cwd().resolve().parents or target == Path(target.anchor):
        raise ChatforgeError(f"--out {out}: that is the working folder or one above it; name a new folder")
    for flag, path in inputs:
        if not path or path.startswith(("hf:", "demo")) or any(ch in path for ch in "*?["):
            continue
        source = Path(path).resolve()
        if source == target or target in source.parents:
            if any(source == target / k or (target / k) in source.parents for k in keep):
                continue
            raise ChatforgeError(f"--out {out} would replace the input {flag} {path}; choose another --out")


def claim(out: str | Path, kind: str, *, overwrite: bool = False, resume: bool = False,
          keep: tuple[str, ...] = (), legacy: tuple[str, ...] = ()) -> None:
    """Make `out` this command's output folder, or raise ChatforgeError saying why not.

    New or empty: marked as ours. Ours, of this kind: `resume` keeps it as it is; `overwrite` empties
    it (but `keep`); neither is an error. Anything else is never touched. `legacy`: files that mark an
    output of this kind written before the marker existed (enough to resume it, never to delete it)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ChatforgeError(f"--out {out}: exists and is not a folder")
    if path.is_dir() and any(path.iterdir()):
        found = owner_kind(path)
        if found is None and resume and any((path / name).exists() for name in legacy):
            check_checkpoints_ours(path)
            mark(path, kind)
            return
        if found is None:
            raise ChatforgeError(f"--out {out}: the folder exists and was not written by chatforge; "
                                 "chatforge replaces only its own outputs: choose a new --out")
        if found != kind:
            raise ChatforgeError(f"--out {out}: holds a chatforge {found} output, not a {kind} one; "
                                 "choose another --out")
        if resume:
            check_checkpoints_ours(path)
            return
        if not overwrite:
            raise ChatforgeError(f"--out {out}: already holds a run; pass --resume to continue it or "
                                 "--overwrite to replace it")
        for child in path.iterdir():
            if child.name not in keep and child.name != OWNER:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    path.mkdir(parents=True, exist_ok=True)
    mark(path, kind)


def check_checkpoints_ours(out: Path) -> None:
    """Before resuming: every checkpoint folder in `out` must be one chatforge started (the Trainer would
    overwrite or rotate away any other)."""
    for ckpt in sorted(out.glob("checkpoint-*")):
        if not ((ckpt / CHECKPOINT_STARTED).exists() or (ckpt / CHECKPOINT_COMPLETE).exists()):
            raise ChatforgeError(f"{ckpt}: a checkpoint folder chatforge did not write; move it out of {out} "
                                 "before resuming")


def check_replaceable(out: str | Path, is_ours) -> None:
    """For outputs replaced whole (shards, a tokenizer): `out` must be new, empty or pass `is_ours`."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ChatforgeError(f"--out {out}: exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not is_ours(path):
        raise ChatforgeError(f"--out {out}: the folder exists and was not written by chatforge for this step; "
                             "chatforge replaces only its own outputs: choose a new --out")


def temporary_sibling(out: str | Path) -> Path:
    """An empty folder next to `out`, to be moved into place by `replace_with`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)  # our own leftover: the name holds this process's id
    tmp.mkdir()
    return tmp


def replace_with(out: str | Path, tmp: Path) -> None:
    """Move `tmp` into place as `out`; an older `out` (already checked to be ours) goes only after."""
    out = Path(out)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
