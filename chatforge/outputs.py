"""Output folders that are provably chatforge's: what a command may replace, and how it writes.

A folder chatforge writes carries `chatforge_output.json` (the kind of output in it), or a shard
manifest. A command replaces only such a folder of its own kind, never a folder that holds any of its
inputs, never the working folder or one above it, and never a folder it did not write, `--overwrite`
or not: the user is told which folder and how to go on. New content is written to a temporary sibling
and renamed into place, so a killed command leaves the old content or the new, never a mix.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from chatforge.errors import ChatforgeError

OWNER = "chatforge_output.json"
CHECKPOINT_STARTED = "chatforge_started.json"   # in a checkpoint folder, before the Trainer writes into it
CHECKPOINT_COMPLETE = "chatforge_complete.json"  # after it wrote every file


def owner_record(folder: str | Path) -> dict:
    """What chatforge recorded about the output in `folder` ({} if it did not write it)."""
    try:
        record = json.loads((Path(folder) / OWNER).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def owner_kind(folder: str | Path) -> str | None:
    """The kind of output chatforge recorded in `folder`, or None if it did not write it."""
    return owner_record(folder).get("kind")


def mark(folder: str | Path, kind: str, **made_from) -> None:
    """Record `folder` as chatforge's output of `kind`; `made_from`: what it was made from (JSON values)."""
    path = Path(folder) / OWNER
    tmp = path.with_name(OWNER + ".tmp")
    tmp.write_text(json.dumps({"kind": kind, "written_by": "chatforge", **made_from}, ensure_ascii=False),
                   encoding="utf-8")
    os.replace(tmp, path)


def _input_paths(spec: str) -> list[Path]:
    """The local paths a source spec may read: itself, a glob's matches, an `hf:` spec naming a local
    folder; none for the demo corpus or a Hub dataset."""
    if spec == "demo" or spec.startswith("demo:"):
        return []
    if spec.startswith("hf:"):
        name = spec[3:].partition(":")[0]
        return [Path(name)] if name and Path(name).exists() else []
    if is_pattern(spec):
        return [Path(p) for p in glob.glob(spec, recursive=True)]
    return [Path(spec)]


def is_pattern(spec: str) -> bool:
    """A glob pattern, unless a file or folder has that very name (`notes[1].txt` is read as named)."""
    return any(ch in spec for ch in "*?[") and not os.path.lexists(spec)


def check_not_inputs(out: str | Path, inputs: list[tuple[str, str | None]], keep: tuple[str, ...] = (),
                     flag: str = "--out") -> None:
    """Refuse an output folder that is, or holds, one of the command's inputs (or is inside a --data
    folder, which would read it next time), or the working folder or one above it.

    inputs: (option name, source spec or path) pairs; keep: sub-folders of `out` the command reuses
    rather than replaces (inputs there are fine); flag: the option that named `out`."""
    target = Path(os.path.abspath(os.path.expanduser(str(out)))).resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents or target == Path(target.anchor) or target == Path.home().resolve():
        raise ChatforgeError(f"{flag} {out}: that is the working folder, one above it or the home folder; "
                             "name a new folder")
    for option, spec in inputs:
        paths = _input_paths(spec) if spec else []
        if option == "--data" and spec and not any(p.exists() for p in paths) and (paths or is_pattern(spec)):
            # before anything is claimed or replaced: a missing input is only an error, never a loss
            raise ChatforgeError(f"{spec}: the pattern matches no files" if is_pattern(spec)
                                 else f"{spec}: no such file or directory")
        for path in paths:
            source = path.resolve()
            if source == target or target in source.parents:
                if any(source == target / k or (target / k) in source.parents for k in keep):
                    continue
                raise ChatforgeError(f"{flag} {out} would replace the input {option} {spec}; choose another {flag}")
            if option == "--data" and source.is_dir() and source in target.parents:
                raise ChatforgeError(f"{flag} {out} is inside the input {option} {spec}, which would read it; "
                                     f"choose another {flag}")


# What chatforge's commands (and the Trainer, TRL, PEFT, `report` and `eval` they run) write at the top of a run
# folder: `--overwrite` deletes these and refuses to delete anything else (a user's notes, their own results).
RUN_OUTPUTS = (
    "config.json", "generation_config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
    "adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.json",
    "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "training_args.bin",
    "run_config.yaml", "summary.json", "README.md", "report.md", "*.png", "eval.json", "eval", "logs", "runs",
    "data", "tokenizer", "base", "chat", "checkpoint-*", "additional_chat_templates",
    ".*.tmp-*", ".*.tmp", ".*.old-*", "chatforge_output.json.tmp", ".aside-*",  # what a killed command left
)


@dataclass
class Claim:
    """What `claim` changed, to be undone if the command fails before its work starts."""

    out: Path
    keep: tuple[str, ...]
    created: bool = False  # the folder is new
    aside: Path | None = None  # the replaced run's entries, waiting in out/.aside-* (a rename in one folder
    # works on any filesystem, a mount point included)

    def undo(self) -> None:
        """The folder as it was: a new one removed; a replaced run put back, what this command wrote removed."""
        if self.created:
            shutil.rmtree(self.out, ignore_errors=True)
        elif self.aside is not None:
            for child in self.out.iterdir():
                if child.name not in self.keep and child.name != OWNER and child != self.aside:
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            for child in self.aside.iterdir():
                child.rename(self.out / child.name)
            self.aside.rmdir()

    def commit(self) -> None:
        """The work has started: the replaced run goes."""
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None
        self.created = False


def claim(out: str | Path, kind: str, *, overwrite: bool = False, resume: bool | None = False,
          keep: tuple[str, ...] = (), flag: str = "--out", set_aside: bool = False) -> Claim:
    """Make `out` this command's output folder, or raise ChatforgeError saying why not.

    New or empty: marked as ours. Ours, of this kind: `resume` keeps it as it is; `overwrite` empties
    it (but `keep`); neither is an error. Anything else is never touched (a run written before chatforge
    marked its folders included: it cannot be resumed or replaced, only read).
    `resume=None`: the command cannot resume (the error message then offers only --overwrite); flag: the option
    that named `out`; set_aside: the replaced run waits in `out/.aside-*` until the returned Claim's
    `commit` (or comes back with `undo`), for commands that check some inputs only after claiming."""
    path = Path(out)
    done = Claim(path, keep, created=not path.exists())
    if path.exists() and not path.is_dir():
        raise ChatforgeError(f"{flag} {out}: exists and is not a folder")
    if path.is_dir() and any(p.name != OWNER for p in path.iterdir()):  # only our marker: a run that failed early
        found = owner_kind(path)
        if found is None:
            raise ChatforgeError(f"{flag} {out}: the folder exists and was not written by chatforge; "
                                 f"chatforge replaces only its own outputs: choose a new {flag}")
        if found != kind:
            raise ChatforgeError(f"{flag} {out}: holds a chatforge {found} output, not a {kind} one; "
                                 f"choose another {flag}")
        if resume:
            check_checkpoints_ours(path)
            return done
        if not overwrite:
            how = "pass --overwrite to replace it" if resume is None else \
                "pass --resume to continue it or --overwrite to replace it"
            raise ChatforgeError(f"{flag} {out}: already holds a run; {how}")
        doomed = [child for child in path.iterdir() if child.name not in keep and child.name != OWNER]
        others = sorted(c.name for c in doomed if not any(fnmatch.fnmatchcase(c.name, p) for p in RUN_OUTPUTS))
        if others:
            raise ChatforgeError(f"{flag} {out}: besides the run chatforge wrote it holds {', '.join(others[:3])}"
                                 f"{' ...' if len(others) > 3 else ''}, which --overwrite would delete; move them "
                                 f"out or choose another {flag}")
        if set_aside and doomed:
            done.aside = path / f".aside-{uuid.uuid4().hex[:8]}"
            done.aside.mkdir()
        for child in doomed:
            if done.aside is not None:
                child.rename(done.aside / child.name)
            else:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    path.mkdir(parents=True, exist_ok=True)
    mark(path, kind)
    return done


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


def holds_only_listed(folder: str | Path, kind: str, legacy: tuple[str, ...] = ()) -> bool:
    """`folder` is chatforge's output of `kind` (False if not), holding nothing but the files its marker lists
    (`files`, as `mark_files` wrote them; `legacy`: the names to allow when an older chatforge's marker lists
    none); a ChatforgeError naming any other entry: what is replaced whole must not take along what a user
    (or another command) put inside."""
    record = owner_record(folder)
    if record.get("kind") != kind:
        return False
    listed = record.get("files")
    listed = listed if isinstance(listed, list) else legacy
    others = sorted(p.name for p in Path(folder).iterdir() if p.name not in listed and p.name != OWNER)
    if others:
        raise ChatforgeError(f"--out {folder}: besides the {kind} chatforge wrote it holds {', '.join(others[:3])}"
                             f"{' ...' if len(others) > 3 else ''}, which would be lost; move them out or choose "
                             "another --out")
    return True


def mark_files(folder: str | Path, kind: str, **made_from) -> None:
    """`mark`, listing the files now in `folder` (see `holds_only_listed`)."""
    mark(folder, kind, files=sorted(p.name for p in Path(folder).iterdir() if p.name != OWNER), **made_from)


def temporary_sibling(out: str | Path) -> Path:
    """An empty folder next to `out`, to be moved into place by `replace_with` (or removed by the caller
    on failure). Made by mkdir, so with the umask's permissions as any folder the user makes (mkdtemp's are
    0700: a tokenizer or shards no one else on the machine could read); mkdir never replaces anything."""
    out = Path(os.path.abspath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def replace_with(out: str | Path, tmp: Path) -> None:
    """Move `tmp` into place as `out`; an older `out` (already checked to be ours) goes only after."""
    out = Path(os.path.abspath(out))
    old = None
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        old.rmdir()  # a fresh name that no one else's file holds
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        old.unlink() if old.is_symlink() else shutil.rmtree(old, ignore_errors=True)


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write to a new temporary name in the same folder, then rename: readers see the old file or the new."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as handle:  # "x": a fresh name, never someone's file; created with the umask
            handle.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
