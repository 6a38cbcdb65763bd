"""Model backends behind one interface, chosen per model at load time.

A backend keeps one KV cache per slot and answers three calls, all on the engine thread:
- `prefill(slots, prompts) -> logits [n, V]`: run whole prompts (the fast backend: in one unpadded
  forward), each one's keys/values written to its slot;
- `decode(tokens, positions) -> logits [B, V]`: one new token for each of slots 0..B-1;
- `move(src, dst, length)`: copy a slot's cache (the scheduler keeps active requests in slots 0..n-1).
"""

from __future__ import annotations

from chatforge.engine.backends.fast import FastModel
from chatforge.engine.backends.hf import HFModel


def make_backend(model, max_batch: int, context_length: int, fast: bool = True, static: bool = False):
    """The fast backend for GPT-2 / Llama checkpoints it supports, the generic one for anything else."""
    if fast and FastModel.supports(model):
        return FastModel(model, max_batch, context_length, static=static)
    return HFModel(model, max_batch, context_length)


__all__ = ["FastModel", "HFModel", "make_backend"]
