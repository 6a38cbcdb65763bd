"""`--preset auto` under a budget: the model shape this machine trains best in it, from one dial, depth.

Depth L sets the rest (nanochat's idea): width 64·L, heads of 64 (L of them); the context is 1024 on
a GPU and 128 on a CPU, where minutes buy few optimizer steps and more of them beat longer sequences
(bench/README.md). The budget becomes tokens D(L): `--max-tokens`, or `--max-time` times the rate
measured here for depth L (a few real training steps with the run's precision, micro-batch and speed
switches), at most `--max-epochs` passes over the corpus. The chosen depth minimises Chinchilla's
fitted loss (Hoffmann et al. 2022, approach 3)

    L(N, D) = E + A / N^0.34 + B / D^0.28,   N = all parameters, D = tokens trained,

whose compute-optimal ratio at large scale is the familiar ~20 tokens per parameter; at CPU minutes it
asks for far fewer, which is what runs measure (bench/README.md, "Time to quality"). Under
`--max-tokens` alone the budget costs no time to measure and the fit, with D fixed, would always grow
the model: there the rule is `--tokens-per-param` (20) tokens per parameter, the deepest shape that
gets them. A small corpus caps the model: past MAX_PARAMS_PER_UNIQUE_TOKEN parameters per token of the
corpus, repeated data stops paying for more parameters, whatever the fit (made for fresh data) predicts
(Muennighoff et al. 2023 fit this effect; their constants, anchored at Chinchilla's optimum, overcorrect
at this scale: bench/README.md). The optimizer follows the budget too: Muon where it sees the corpus at
most MUON_MAX_PASSES times, AdamW where it repeats it more (Muon learns faster and overfits faster).
"""

from __future__ import annotations

import time
from dataclasses import replace

from chatforge.modeling import ModelShape, padded_vocab, swiglu_width

HEAD_DIM = 64
BUDGET_CONTEXT = {"cuda": 1024, "cpu": 128}
MAX_DEPTH = 48
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def depth_shape(depth: int, vocab_size: int, context_length: int, arch: str = "gpt2") -> ModelShape:
    return ModelShape(arch=arch, n_layer=depth, d_model=HEAD_DIM * depth, n_head=depth,
                      context_length=context_length, vocab_size=padded_vocab(vocab_size))


def parameters(shape: ModelShape) -> int:
    """All parameters of `shape` (tied embedding counted once), without building it."""
    d, v = shape.d_model, shape.vocab_size
    if shape.arch == "gpt2":
        return v * d + shape.context_length * d + shape.n_layer * (12 * d * d + 13 * d) + 2 * d
    kv = d * (shape.n_kv_head or shape.n_head) // shape.n_head
    return v * d + shape.n_layer * (2 * d * d + 2 * d * kv + 3 * d * swiglu_width(d) + 2 * d) + d


def predicted_loss(n_params: float, tokens: float) -> float:
    c = CHINCHILLA
    return c["E"] + c["A"] / n_params ** c["alpha"] + c["B"] / max(tokens, 1.0) ** c["beta"]


def step_seconds(shape: ModelShape, tok, micro: int, precision: str, cfg, steps: int = 3) -> float:
    """Seconds per training micro-step (forward, backward, the run's optimizer) of a fresh model of `shape`: the
    fastest of `steps` after one warm-up step on random tokens (a shared machine's noise only ever slows a step,
    and a slowed depth would be picked against unfairly)."""
    import torch

    from chatforge.modeling import new_model
    from chatforge.train.common import make_optimizer
    from chatforge.train.speedups import apply_speedups

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = new_model(shape, tok, seed=0).to(device).train()
    # never compiled: a compile per candidate depth would cost more than the whole measurement
    apply_speedups(model, replace(cfg, compile=False), precision, log=lambda *_: None)
    optimizer = make_optimizer(model, 1e-4, 0.0, kind=cfg.optimizer or "adamw")
    ids = torch.randint(0, len(tok), (micro, shape.context_length), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def one_step():
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    one_step()
    fastest = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        one_step()
        fastest = min(fastest, time.perf_counter() - start)
    return fastest


# On the quickstart's corpus (60k tokens seen 12 times) depths 3-4 (30-63 parameters per token) scored best
# and depths 6-7 (190-300) no better in twice the time; bench/README.md, "Quickstart's model"
MAX_PARAMS_PER_UNIQUE_TOKEN = 64


def pick_depth(budget_tokens, vocab_size: int, context_length: int, arch: str = "gpt2",
               tokens_per_param: float | None = None, unique_tokens: float | None = None, log=print) -> ModelShape:
    """The depth whose shape has the lowest predicted loss for `budget_tokens(shape)` tokens, or with
    `tokens_per_param`, the deepest one the budget gives that many tokens per parameter (at least depth 1);
    never past MAX_PARAMS_PER_UNIQUE_TOKEN parameters per token of a corpus of `unique_tokens`.
    Depths are tried upwards (budget_tokens may measure each); the first that does worse ends the search."""
    best, best_loss = depth_shape(1, vocab_size, context_length, arch), float("inf")
    for depth in range(1, MAX_DEPTH + 1):
        shape = depth_shape(depth, vocab_size, context_length, arch)
        n_params = parameters(shape)
        if unique_tokens and depth > 1 and n_params > MAX_PARAMS_PER_UNIQUE_TOKEN * unique_tokens:
            log(f"  depth {depth} ({depth}x{shape.d_model}): {n_params / 1e6:.2f}M parameters, past "
                f"{MAX_PARAMS_PER_UNIQUE_TOKEN} per token of this {unique_tokens / 1e6:.2f}M-token corpus: not tried")
            break
        tokens = budget_tokens(shape)
        loss = predicted_loss(n_params, tokens)
        log(f"  depth {depth} ({depth}x{shape.d_model}): {n_params / 1e6:.2f}M parameters, {tokens / 1e6:.2f}M "
            f"tokens in the budget ({tokens / n_params:.1f} per parameter), predicted loss {loss:.3f}")
        if (tokens < tokens_per_param * n_params) if tokens_per_param else loss >= best_loss:
            break
        best, best_loss = shape, loss
    return best


# Muon beat AdamW in held-out bits per byte by 7-8% at 1.75 passes over a corpus and by 3.5% at 6, and overfitted
# far worse at 12 (the quickstart's: val loss 3.95 against 2.93); measured before Muon followed its LR schedule
# (bench/README.md)
MUON_MAX_PASSES = 6.0


def budget_optimizer(passes: float | None, processes: int, log) -> str:
    """--optimizer unset: muon for a budget-sized (`passes` known) one-process run that sees its corpus at most
    MUON_MAX_PASSES times, else adamw."""
    if passes is None or processes > 1:
        return "adamw"
    choice = "muon" if passes <= MUON_MAX_PASSES else "adamw"
    log(f"optimizer: {choice} (the budget passes over the corpus {passes:.1f} times; Muon up to {MUON_MAX_PASSES:g})")
    return choice
