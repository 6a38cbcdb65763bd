"""Sampling settings of one request, and the sampler that picks its next token."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from chatforge.config import option
from chatforge.errors import ChatforgeError

# Below this a positive temperature is raised to it (as vLLM does): logits / 1e-300 overflow to inf and
# the softmax turns to NaN, where 0.01 already samples the argmax in practice.
MIN_TEMPERATURE = 1e-2
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes a 64-bit seed
# seen logits are divided by the penalty (then by the temperature): near 1e-37 that overflows fp32 and sampling
# meets inf - inf; [0.01, 100] stays far from it and holds every useful penalty
REPETITION_PENALTY_RANGE = (1e-2, 100.0)


@dataclass
class SamplingParams:
    """How to pick tokens; shared by `generate`, `chat`, the engine and the HTTP API."""

    max_new_tokens: int = option(256, "tokens to generate at most", min=1, metavar="N")
    temperature: float = option(0.8, "0 = greedy", min=0.0, max=100.0)
    top_k: int = option(0, "keep the k likeliest tokens; 0 = off", min=0)
    top_p: float = option(1.0, "nucleus sampling; 1.0 = off", min=0.0, max=1.0, exclusive_min=True)
    repetition_penalty: float = option(1.0, "1.0 = off", min=REPETITION_PENALTY_RANGE[0],
                                       max=REPETITION_PENALTY_RANGE[1])
    seed: int | None = option(None, "seeded sampling: the same seed gives the same text", min=0, max=MAX_SEED)
    stop: list[str] = field(default_factory=list, metadata={"cli": False})

    def validate(self) -> None:
        """Raise ChatforgeError naming the first bad value; called where a request is made."""
        from chatforge.config import check_fields

        check_fields(self)
        if not all(isinstance(s, str) for s in self.stop):
            raise ChatforgeError("stop must be a list of strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 and self.repetition_penalty == 1.0


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                history: torch.Tensor | None = None) -> torch.Tensor:
    """Pick the next token id for each row of `logits` [B, V] (fp32)."""
    if params.repetition_penalty != 1.0 and history is not None and history.numel():
        seen = logits.gather(-1, history)
        seen = torch.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
        logits = logits.scatter(-1, history, seen)
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / max(params.temperature, MIN_TEMPERATURE)
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > params.top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return draw(logits.softmax(-1), generator)


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """The first index of the largest value in each row of `logits` [B, V] (fp32); NaN counts as the largest,
    as in torch.max. On a CPU through NumPy's SIMD argmax: 2-3x faster than torch's max(dim) or argmax, a
    few % of a small model's decode step (bench/README.md)."""
    if logits.device.type == "cpu":
        return logits.numpy().argmax(-1).tolist()
    return logits.max(dim=-1).indices.tolist()


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of `probs` by inverse CDF: one uniform number per row, found in the cumulative sum
    (fp64, so that rounding never shifts a rare token's share). Why not torch.multinomial: on a CPU it draws
    a random number per vocabulary entry, ~240 us per 8k-token row against ~25 us (bench/README.md)."""
    cdf = probs.double().cumsum(-1)
    total = cdf[..., -1:]
    if not 0 < float(total.min()) <= float(total.max()) < float("inf"):  # NaN fails too: that request alone
        raise ChatforgeError("sampling met non-finite probabilities")
    # a seeded request's generator is on the CPU
    u = torch.rand(total.shape, generator=generator, dtype=torch.float64,
                   device=generator.device if generator is not None else probs.device)
    picked = torch.searchsorted(cdf, u.to(probs.device) * total, right=True)
    return picked.clamp_(max=probs.shape[-1] - 1).squeeze(-1)
