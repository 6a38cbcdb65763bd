"""Several shard folders sampled by weight: `pretrain --data web/:0.7 --data books/:0.3`.

An epoch of the mixture holds as many blocks as the folders together; each folder fills its weight's share
of them, repeated (a small folder seen more than once) or subsampled (a large one seen in part), in a seeded
order. The Trainer's sampler shuffles the mixture as it shuffles one folder. Validation reads every folder's
held-out blocks once each, unweighted.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from chatforge.data.shards import MANIFEST, Blocks, PackedBlocks
from chatforge.errors import ChatforgeError


def weighted_folder(spec: str) -> tuple[str, float] | None:
    """`DIR:WEIGHT` for a shard folder DIR -> (DIR, WEIGHT); None for anything else (a source spec)."""
    head, sep, tail = spec.rpartition(":")
    try:
        weight = float(tail) if sep and head else None
    except ValueError:
        return None
    if weight is None:
        return None
    if not (Path(head) / MANIFEST).is_file():
        if Path(head).exists():
            raise ChatforgeError(f"--data {spec}: weights apply to shard folders (made by chatforge data prepare)")
        return None
    if not math.isfinite(weight) or weight <= 0:
        raise ChatforgeError(f"--data {spec}: a mixture weight must be a positive number")
    return head, weight


class MixtureBlocks(Blocks):
    """Blocks drawn from several `PackedBlocks` in proportion to `weights` (see the module docstring)."""

    def __init__(self, parts: list[PackedBlocks], weights: list[float], seed: int, whole_batches: bool = True):
        self.parts, self.whole_batches = parts, whole_batches
        self.block_size = parts[0].block_size
        top = max(weights, default=0.0)
        weights = [w / top for w in weights] if top > 0 else weights  # 1e308 + 1e308 would be inf
        total, norm = sum(len(p) for p in parts), sum(weights)
        if not total or norm <= 0:
            raise ChatforgeError("a data mixture needs blocks to draw from and a positive total weight")
        self.counts = [round(total * w / norm) for w in weights]
        empty = [i for i, (p, c) in enumerate(zip(parts, self.counts)) if not c]
        if empty:  # a weight so small that its folder would silently contribute nothing
            raise ChatforgeError(f"a data mixture weight gives folder {empty[0] + 1} no block of the {total:,} "
                                 "per epoch")
        rng = np.random.default_rng(seed)
        source, index = [], []
        for j, (part, count) in enumerate(zip(parts, self.counts)):
            if count and not len(part):
                raise ChatforgeError("a weighted --data folder holds no whole block of this context length")
            laps = [rng.permutation(len(part)) for _ in range(math.ceil(count / max(1, len(part))))]
            index.append(np.concatenate(laps)[:count] if laps else np.zeros(0, dtype=np.int64))
            source.append(np.full(count, j))
        self.source, self.index = np.concatenate(source), np.concatenate(index)

    def __len__(self) -> int:
        return len(self.source)

    def rows(self, indices) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        src, idx = self.source[indices], self.index[indices]
        out = np.empty((len(indices), self.block_size), dtype=np.int64)
        for j in np.unique(src):
            sel = src == j
            out[sel] = self.parts[j].rows(idx[sel])
        return out
