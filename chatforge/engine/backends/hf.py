"""The generic backend: any transformers causal LM through its own forward and cache.

One request at a time inside each decode step: slower than the fast backend, but it runs every
architecture transformers knows.
"""

from __future__ import annotations

import torch

class HFModel:
    """Any transformers causal LM through its own forward and cache: one request at a time per step."""

    def __init__(self, model, max_batch: int, ctx: int):
        self.model = model
        self.device = next(model.parameters()).device
        self.caches: list = [None] * max_batch

    def prefill(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        rows = []
        for slot, ids in zip(slots, prompts):
            out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True, logits_to_keep=1)
            self.caches[slot] = out.cache
            rows.append(out.logits[0, -1].float())
        return torch.stack(rows)

    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        rows = []
        for slot, token in enumerate(tokens):
            out = self.model(input_ids=torch.tensor([[token]], device=self.device), cache=self.caches[slot],
                             use_cache=True, logits_to_keep=1)
            self.caches[slot] = out.cache
            rows.append(out.logits[0, -1].float())
        return torch.stack(rows)

    def move(self, src: int, dst: int, length: int) -> None:
        self.caches[dst], self.caches[src] = self.caches[src], None

