"""The on-disk shard format: a manifest.json next to flat token files, and the readers of it.

`manifest.json` records sources, tokenizer fingerprint and per-split shard files with token, document and
byte counts. A shard file name is relative to the manifest's folder (a merged folder lists its parts' files
as `../part/train_0000.bin`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from chatforge.errors import ChatforgeError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def holds_shards(folder: Path) -> bool:
    """Shards chatforge wrote: a manifest of ours next to the files it lists, and nothing else."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        listed = {s["file"] for split in ("train", "val") for s in manifest[split]["shards"]} | {MANIFEST}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return "cache_key" in manifest and {p.name for p in folder.iterdir()} <= listed


def publish(tmp: Path, out: str | Path, manifest: dict) -> None:
    """Write `manifest` into `tmp` (a temporary sibling holding the shards, if any) and move it into place as
    `out`: the manifest is written last, so a killed run never leaves one next to partial shards."""
    import shutil

    from chatforge.outputs import replace_with

    try:
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
        replace_with(out, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when it was moved into place


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a shard folder, checked for what every reader indexes (a hand-edited or foreign file
    is one line here, not a KeyError later)."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise ChatforgeError(f"{path}: not a readable shard manifest ({err})") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise ChatforgeError(f"{path}: not a chatforge shard manifest ({problem}); prepare the data again")
    return manifest


def _manifest_problem(manifest) -> str | None:
    if not isinstance(manifest, dict):
        return "not a JSON object"
    for key, kinds in (("dtype", str), ("vocab_size", int), ("tokenizer_fingerprint", str), ("train", dict),
                       ("val", dict)):
        if not isinstance(manifest.get(key), kinds):
            return f"'{key}' missing or of the wrong type"
    if manifest["dtype"] not in ("uint16", "uint32"):
        return f"dtype {manifest['dtype']!r}"
    for split in ("train", "val"):
        shards = manifest[split].get("shards")
        if not isinstance(shards, list) or not all(
                isinstance(sh, dict) and isinstance(sh.get("file"), str) and isinstance(sh.get("tokens"), int)
                for sh in shards) \
                or not isinstance(manifest[split].get("tokens"), int):
            return f"'{split}' shards missing or malformed"
    return None


def load_split(folder: str | Path, split: str) -> np.ndarray:
    """All tokens of one split as one array, for inspection (a multi-shard split is read into memory)."""
    manifest = read_manifest(folder)
    arrays = [np.memmap(Path(folder) / s["file"], dtype=manifest["dtype"], mode="r")
              for s in manifest[split]["shards"] if s["tokens"] > 0]
    if not arrays:
        return np.zeros(0, dtype=manifest["dtype"])
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


class Blocks:
    """What the training datasets share: items from `rows(indices)` ([n, block] int64), labels == input_ids."""

    whole_batches = True

    def rows(self, indices) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        import torch

        ids = torch.from_numpy(self.rows([index])[0])
        return {"input_ids": ids, "labels": ids}

    def __getitems__(self, indices) -> dict | list[dict]:
        """A whole micro-batch with one numpy gather: torch's DataLoader calls this instead of indexing
        item by item; the sampler (order, shuffling, resume position) is unchanged. With
        `whole_batches=False`, the items one by one, for a stock collator."""
        import torch

        if not self.whole_batches:
            return [self[i] for i in indices]
        ids = torch.from_numpy(self.rows(indices))
        return {"input_ids": ids, "labels": ids}


class PackedBlocks(Blocks):
    """Map-style dataset of non-overlapping `block_size` windows over a split's memory-mapped shards.

    Items are {"input_ids", "labels"} with labels == input_ids: the causal-LM head shifts them, so the
    model predicts every next token, across document boundaries (separated by <|endoftext|>). Blocks
    never span two shards (a shard's last partial block is left out), so nothing is ever concatenated
    in memory: corpora larger than RAM stay on disk.
    """

    def __init__(self, folder: str | Path, split: str, block_size: int, whole_batches: bool = True):
        manifest = read_manifest(folder)
        self.block_size, self.whole_batches = block_size, whole_batches
        self.shards = []
        for shard in manifest[split]["shards"]:
            n = shard["tokens"] // block_size
            if n:
                path = Path(folder) / shard["file"]
                try:
                    tokens = np.memmap(path, dtype=manifest["dtype"], mode="r")
                except (OSError, ValueError) as err:
                    raise ChatforgeError(f"{folder}: cannot read its shard {shard['file']} ({err})") from None
                if len(tokens) != shard["tokens"]:  # e.g. a merged folder's part prepared again since
                    raise ChatforgeError(f"{path}: holds {len(tokens):,} tokens where {folder}/{MANIFEST} lists "
                                         f"{shard['tokens']:,}; prepare (or merge) it again")
                self.shards.append(tokens[: n * block_size].reshape(n, block_size))
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        self.n_blocks = int(self.offsets[-1])

    def __len__(self) -> int:
        return self.n_blocks

    def rows(self, indices) -> np.ndarray:
        """The blocks at `indices` as one int64 array, gathered shard by shard."""
        indices = np.asarray(indices, dtype=np.int64)
        which = np.searchsorted(self.offsets, indices, side="right") - 1
        out = np.empty((len(indices), self.block_size), dtype=np.int64)
        for shard in np.unique(which):
            sel = which == shard
            out[sel] = self.shards[shard][indices[sel] - self.offsets[shard]]
        return out


def collate_blocks(batch):
    """Trainer data collator: a batch from `PackedBlocks.__getitems__` passes through; a list of items
    (another dataset) is stacked. Never adds an attention_mask: packed blocks have no padding."""
    import torch

    if isinstance(batch, dict):
        return batch
    ids = torch.stack([torch.as_tensor(item["input_ids"]) for item in batch])
    labels = torch.stack([torch.as_tensor(item.get("labels", item["input_ids"])) for item in batch])
    return {"input_ids": ids, "labels": labels}


def unigram_entropy(folder: str | Path, split: str = "train") -> float:
    """Entropy (nats) of the split's unigram token distribution: the loss of a model that ignores context."""
    manifest = read_manifest(folder)
    counts = np.zeros(manifest["vocab_size"], dtype=np.int64)
    for shard in manifest[split]["shards"]:
        counts += np.bincount(np.memmap(Path(folder) / shard["file"], dtype=manifest["dtype"], mode="r"),
                              minlength=len(counts))[: len(counts)]
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
