"""`chatforge data merge`: one manifest over shard folders made on several workers, nothing copied."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from chatforge.config import option
from chatforge.data.shards import holds_shards, publish, read_manifest
from chatforge.errors import ChatforgeError


@dataclass
class MergeConfig:
    """Settings of `chatforge data merge`."""

    parts: list[str] = option([], "shard folders to combine (e.g. the K parts of `data prepare --num-shards K`)",
                              positional=True, metavar="DIR")
    out: str = option("", "the merged folder: a manifest that lists the parts' shard files (nothing is copied)",
                      metavar="DIR")

    def validate(self) -> None:
        if len(self.parts) < 2 or not self.out:
            raise ChatforgeError("data merge needs two or more shard folders and --out DIR")


AGREE = ("version", "dtype", "vocab_size", "tokenizer_fingerprint", "separator_id", "val_fraction")


def merge(cfg: MergeConfig, log=print) -> dict:
    """One manifest over several shard folders made with the same tokenizer, listing their files by
    relative path: `pretrain --data OUT` then reads all of them, and no token is copied. The parts of one
    `--num-shards K` run must all be there, each once."""
    from chatforge.outputs import check_not_inputs, check_replaceable, temporary_sibling

    cfg.validate()
    out = Path(cfg.out)
    check_not_inputs(out, [("--parts", p) for p in cfg.parts])
    real = [Path(os.path.realpath(p)) for p in cfg.parts]
    if len(set(real)) < len(real):
        raise ChatforgeError("data merge: a folder is named twice; each part once")
    inside = next((p for p, r in zip(cfg.parts, real) if r in Path(os.path.realpath(out)).parents), None)
    if inside is not None:
        raise ChatforgeError(f"--out {cfg.out}: inside the part {inside}; put the merged folder beside the parts")
    manifests = [read_manifest(p) for p in cfg.parts]
    first = manifests[0]
    for path, m in zip(cfg.parts[1:], manifests[1:]):
        differ = [k for k in AGREE if m.get(k) != first.get(k)]
        if differ:
            raise ChatforgeError(f"{path}: not made like {cfg.parts[0]} (different {', '.join(differ)}): "
                                 "merge only shards of one tokenizer and settings")
    split_parts = [m.get("part") for m in manifests]
    if any(split_parts):
        counts = {p["of"] for p in split_parts if p}
        indices = sorted(p["index"] for p in split_parts if p)
        if None in split_parts or len(counts) > 1 or indices != list(range(next(iter(counts)))):
            raise ChatforgeError(f"the parts of a --num-shards run must all be merged, each once: got part indices "
                                 f"{indices} of {sorted(counts)}")
        if len({json.dumps(m.get("sources")) for m in manifests}) > 1 or \
                len({p["documents_read"] for p in split_parts}) > 1:
            raise ChatforgeError("these parts were prepared from different sources; merge the parts of one "
                                 "--num-shards run")
    check_replaceable(out, holds_shards)

    def combined(split: str) -> dict:
        shards = [{"file": os.path.relpath(os.path.realpath(Path(part) / s["file"]), os.path.realpath(out)),
                   "tokens": s["tokens"]}
                  for part, m in zip(cfg.parts, manifests) for s in m[split]["shards"]]
        totals = {k: sum(m[split].get(k, 0) for m in manifests) for k in ("tokens", "documents", "bytes")}
        return {**first[split], **totals, "shards": shards}

    key = hashlib.sha256(json.dumps([m.get("cache_key") for m in manifests]).encode()).hexdigest()[:16]
    manifest = {**{k: first.get(k) for k in AGREE}, "cache_key": key,
                "sources": sorted({s for m in manifests for s in m.get("sources", [])}),
                "merged_from": [os.path.relpath(r, os.path.realpath(out)) for r in real],
                "train": combined("train"), "val": combined("val"),
                "records": sum(m.get("records", 0) for m in manifests)}
    publish(temporary_sibling(out), out, manifest)
    log(f"data: merged {len(cfg.parts)} folders, {manifest['train']['tokens']:,} train / "
        f"{manifest['val']['tokens']:,} val tokens (no copy) -> {out}")
    return manifest
