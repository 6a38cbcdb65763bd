"""Stage 2: a text corpus as packed token shards on disk, tokenized once.

- `prepare.py`: `chatforge data prepare` (all cores, tiktoken where it applies, `--num-shards` parts);
- `merge.py`: `chatforge data merge`, one manifest over several workers' parts;
- `shards.py`: the manifest and shard files, and `PackedBlocks`, the training dataset over them;
- `mixture.py`: several shard folders sampled by weight (`pretrain --data web/:0.7 --data books/:0.3`).
"""

from chatforge.data.merge import MergeConfig, merge
from chatforge.data.prepare import DataConfig, prepare
from chatforge.data.shards import (
    MANIFEST,
    PackedBlocks,
    collate_blocks,
    holds_shards,
    load_split,
    read_manifest,
    unigram_entropy,
)

__all__ = ["MANIFEST", "DataConfig", "MergeConfig", "PackedBlocks", "collate_blocks", "holds_shards", "load_split",
           "merge", "prepare", "read_manifest", "unigram_entropy"]
