"""`--preset auto` under a budget: the model shape this machine trains best in it, from one dial, depth.

Depth L sets the rest (nanochat's idea): width 64·L, heads of 64 (L of them); the context is 1024 on
a GPU and 128 on a CPU, where minutes buy few optimizer steps and more of them beat longer sequences
(bench/README.md). The budget becomes tokens D(L): `--max-tokens`, or `--max-time` times the rate
measured here for depth L (a few real training steps with the run's precision, micro-batch, speed switches
and optimizer, taken in turns with depth L-1's so that a busy machine slows both alike), at most
`--max-epochs` passes over the corpus. The chosen depth minimises Chinchilla's
fitted loss (Hoffmann et al. 2022, approach 3)

    L(N, D) = E + A / N^0.34 + B / D^0.28,   N = all parameters, D = tokens trained,

whose compute-optimal ratio at large scale is the familiar ~20 tokens per parameter; at CPU minutes it
asks for far fewer, which is what runs measure (bench/README.md, "Time to quality"). The fit was made with
AdamW; Muon runs' tokens count plainly too (at their 4,096-token steps it picked the best shapes measured). Under
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
# tokens a micro-batch of a budget-sized Muon run on a CPU (pretrain.micro_batch): 32 x 128 learned more per token
# than 8 or 16 x 128, and 64 x 128 less (bench/README.md, "The budget's batch")
BUDGET_STEP_TOKENS = 4096
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


def step_times(shapes: list[ModelShape], tok, micro: int, precision: str, cfg, kinds: tuple) -> list[dict]:
    """Seconds of a training micro-step of fresh models of `shapes`: {"forward_backward": s, kind: s for each
    optimizer step in `kinds`}. Measured in turns, one step of every shape per round, so that a shared
    machine's slow spell slows them alike; the fastest of 3 rounds after a warm-up round (noise only ever
    slows a step, and a slowed shape would be picked against unfairly)."""
    import torch

    from chatforge.modeling import new_model
    from chatforge.train.common import make_optimizer
    from chatforge.train.speedups import apply_speedups

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    runs = []
    for shape in shapes:
        model = new_model(shape, tok, seed=0).to(device).train()
        # never compiled: a compile per candidate depth would cost more than the whole measurement
        apply_speedups(model, replace(cfg, compile=False), precision, log=lambda *_: None)
        runs.append((model, {kind: make_optimizer(model, 1e-4, 0.0, kind=kind) for kind in kinds}))
    ids = {s.context_length: torch.randint(0, len(tok), (micro, s.context_length), device=device) for s in shapes}

    def seconds(work) -> float:
        start = time.perf_counter()
        work()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def forward_backward(model, ids):
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()

    fastest = [dict.fromkeys(("forward_backward", *kinds), float("inf")) for _ in shapes]
    for round_ in range(4):
        for shape, (model, optimizers), best in zip(shapes, runs, fastest):
            took = {"forward_backward": seconds(lambda: forward_backward(model, ids[shape.context_length]))}
            took |= {kind: seconds(optimizer.step) for kind, optimizer in optimizers.items()}
            model.zero_grad(set_to_none=True)
            if round_:  # round 0 warms up
                best.update({part: min(best[part], took[part]) for part in took})
    return fastest


class Budget:
    """Tokens a shape trains in the run's budget: `max_tokens`, at most `max_epochs` passes over the corpus,
    and under `max_time` the time over a micro-step's seconds measured here (`measure`), with the optimizer
    the run would use (`cfg.optimizer`, else budget_optimizer's pick at that shape's passes)."""

    def __init__(self, cfg, tok, micro: int, precision: str, context_length: int, processes: int,
                 corpus_tokens: int | None):
        self.cfg, self.tok, self.micro, self.precision = cfg, tok, micro, precision
        self.context_length, self.processes, self.corpus_tokens = context_length, processes, corpus_tokens
        self.accum = accumulation(cfg.batch_tokens, micro * context_length * processes)
        self.cap = min(cfg.max_tokens or float("inf"), cfg.max_epochs * (corpus_tokens or float("inf")))
        self.measured: dict = {}  # repr(shape) -> its latest step_times

    def measure(self, shapes: list[ModelShape]) -> list[float]:
        """Each shape's tokens in the budget, measured side by side under --max-time."""
        if self.cfg.max_time:
            kinds = (self.fixed_optimizer,) if self.fixed_optimizer else ("adamw", "muon")
            times = step_times(shapes, self.tok, self.micro, self.precision, self.cfg, kinds)
            self.measured |= {repr(shape): t for shape, t in zip(shapes, times)}
        return [self.tokens(shape) for shape in shapes]

    def tokens(self, shape: ModelShape, optimizer: str | None = None) -> float:
        if not self.cfg.max_time:
            return self.cap
        times, kind = self.measured[repr(shape)], optimizer or self.optimizer(shape)
        step = times["forward_backward"] + times[kind] / self.accum  # one optimizer step per `accum` micro-steps
        return min(self.cap, self.cfg.max_time / step * self.micro * self.context_length * self.processes)

    def passes(self, shape: ModelShape, optimizer: str | None = None) -> float | None:
        return self.tokens(shape, optimizer) / self.corpus_tokens if self.corpus_tokens else None

    def muon_passes(self, shape: ModelShape) -> float | None:
        """Passes over the corpus a Muon run of `shape` makes in the budget: what budget_optimizer decides by."""
        return self.passes(shape, "muon")

    @property
    def fixed_optimizer(self) -> str | None:
        return fixed_optimizer(self.cfg, self.processes)

    def optimizer(self, shape: ModelShape) -> str:
        """The fixed optimizer, else budget_optimizer's pick: Muon if the budget with Muon passes over the corpus
        at most MUON_MAX_PASSES times (AdamW, never slower, would pass at least as often), else AdamW."""
        return self.fixed_optimizer or budget_optimizer(self.muon_passes(shape), 1, lambda *_: None)


def fixed_optimizer(cfg, processes: int) -> str | None:
    """The run's optimizer whatever the shape: --optimizer, or AdamW for several processes (budget_optimizer);
    None while the budget decides."""
    return cfg.optimizer or ("adamw" if processes > 1 else None)


def accumulation(batch_tokens: int | None, tokens_per_pass: int) -> int:
    """Micro-steps per optimizer step: --batch-tokens over the tokens of one pass of every process."""
    return max(1, round((batch_tokens or tokens_per_pass) / tokens_per_pass))


# On the quickstart's corpus (60k tokens seen 12 times) depths 3-4 (30-63 parameters per token) scored best
# and depths 6-7 (190-300) no better in twice the time; bench/README.md, "Quickstart's model"
MAX_PARAMS_PER_UNIQUE_TOKEN = 64


def pick_depth(budget_tokens, vocab_size: int, context_length: int, arch: str = "gpt2",
               tokens_per_param: float | None = None, unique_tokens: float | None = None,
               log=print) -> ModelShape:
    """The depth whose shape has the lowest predicted loss for the tokens `budget_tokens([shapes])` gives
    it, or with `tokens_per_param`, the deepest one the budget gives that many tokens per parameter (at least
    depth 1); never past MAX_PARAMS_PER_UNIQUE_TOKEN parameters per token of a corpus of `unique_tokens`.
    Depths are tried upwards, each measured side by side with the best so far (budget_tokens may measure
    them); the first that does worse ends the search."""
    best = depth_shape(1, vocab_size, context_length, arch)
    for depth in range(1, MAX_DEPTH + 1):
        shape = depth_shape(depth, vocab_size, context_length, arch)
        n_params = parameters(shape)
        if unique_tokens and depth > 1 and n_params > MAX_PARAMS_PER_UNIQUE_TOKEN * unique_tokens:
            log(f"  depth {depth} ({depth}x{shape.d_model}): {n_params / 1e6:.2f}M parameters, past "
                f"{MAX_PARAMS_PER_UNIQUE_TOKEN} per token of this {unique_tokens / 1e6:.2f}M-token corpus: not tried")
            break
        *beside, tokens = budget_tokens([best, shape] if depth > 1 else [shape])
        loss = predicted_loss(n_params, tokens)
        best_loss = predicted_loss(parameters(best), beside[0]) if beside else float("inf")
        log(f"  depth {depth} ({depth}x{shape.d_model}): {n_params / 1e6:.2f}M parameters, {tokens / 1e6:.2f}M "
            f"tokens in the budget ({tokens / n_params:.1f} per parameter), predicted loss {loss:.3f}"
            + (f"; depth {best.n_layer} beside it: {beside[0] / 1e6:.2f}M tokens, {best_loss:.3f}"
               if beside and not tokens_per_param else ""))
        if (tokens < tokens_per_param * n_params) if tokens_per_param else loss >= best_loss:
            break
        best = shape
    return best


# With its LR schedule, on the quickstart's corpus at 4x256 (val loss, Muon against AdamW): 2.878 vs 3.136 at 6
# passes, 3.049 vs 2.942 at 9, 3.602 vs 2.815 at 12 (bench/README.md)
MUON_MAX_PASSES = 6.0


def budget_optimizer(passes: float | None, processes: int, log) -> str:
    """--optimizer unset: muon for a budget-sized (`passes` known) one-process run that sees its corpus at most
    MUON_MAX_PASSES times with Muon (`passes`, Muon's), else adamw."""
    if passes is None or processes > 1:
        return "adamw"
    choice = "muon" if passes <= MUON_MAX_PASSES else "adamw"
    log(f"optimizer: {choice} (the budget with Muon passes over the corpus {passes:.1f} times; Muon up to "
        f"{MUON_MAX_PASSES:g})")
    return choice
