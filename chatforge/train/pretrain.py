"""Stage 4: pretrain a GPT from scratch with the transformers `Trainer` (causal LM, never masked LM).

Pipeline: tokenizer (trained if none given) -> packed shards (prepared once, cached) -> a stock
GPT2LMHeadModel / LlamaForCausalLM from a size preset -> Trainer with AdamW (or Muon), warm-up + cosine/WSD,
clipping, accumulation to a batch measured in tokens, bf16 where the hardware has it -> a standard
Hugging Face directory in `out/` (checkpoints in `out/checkpoint-N/`, resumable).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from chatforge.config import option
from chatforge.errors import ChatforgeError
from chatforge.modeling import ARCHS, PRESETS, quiet_optional_imports
from chatforge.text.sources import SourceOptions
from chatforge.text.tokenizer import MIN_VOCAB
from chatforge.train.common import OPTIMIZERS, RunSettings, world_size


@dataclass
class PretrainConfig(SourceOptions, RunSettings):
    """Everything that defines a pretraining run; saved as out/run_config.yaml."""

    out: str = option("run", "run folder", metavar="DIR")
    tokenizer: str | None = option(None, "tokenizer folder; trained on --data when not given", metavar="DIR")
    vocab_size: int = option(8192, "vocabulary of the tokenizer trained when none is given", min=MIN_VOCAB,
                             max=2**31 - 1, metavar="N")
    # model
    arch: str = option("gpt2", "model architecture", choices=ARCHS)
    preset: str = option("auto", "size (auto: under --max-time or --max-tokens, the depth the budget trains best "
                                 "on this machine; else tiny on CPU, gpt2-small on GPU)", choices=("auto", *PRESETS),
                         metavar="NAME")
    n_layer: int | None = option(None, "layers (overrides the preset)", min=1, max=1024, metavar="N")
    d_model: int | None = option(None, "width (overrides the preset)", min=1, max=65536, metavar="N")
    n_head: int | None = option(None, "attention heads (overrides the preset)", min=1, max=1024, metavar="N")
    n_kv_head: int | None = option(None, "key/value heads, Llama (grouped-query attention)", min=1, max=1024,
                                   metavar="N")
    context_length: int | None = option(None, "tokens per sequence (overrides the preset)", min=2, max=1 << 20,
                                        metavar="N")
    dropout: float = option(0.0, "dropout probability", min=0.0, max=1.0, metavar="P")
    model_vocab_size: int | None = option(None, "the model's vocabulary if larger than the tokenizer's (rounded up "
                                                "to 64; GPT-2: 50304): room for added tokens", min=1,
                                          max=2**31 - 1, metavar="N")
    init_from: str | None = option(None, "continue pretraining a local Hugging Face checkpoint", metavar="DIR")
    # budget: max_steps > max_tokens > ~20 tokens per parameter; max_time caps any of them
    max_tokens: int | None = option(None, "stop after N training tokens", min=1, metavar="N")
    tokens_per_param: float = option(20.0, "tokens per parameter (Chinchilla): the budget when none is given, and "
                                           "the shape --preset auto picks under --max-tokens", min=0.0,
                                     exclusive_min=True, metavar="R")
    max_epochs: float = option(10.0, "at most this many passes over the corpus", min=0.0, exclusive_min=True,
                               metavar="N")
    # optimisation
    batch_tokens: int | None = option(None, "tokens per optimizer step (gradient accumulation makes it up)", min=1,
                                      metavar="N")
    micro_batch_size: int | None = option(None, "sequences per forward pass (auto: 32 on GPU; on CPU 8, or 4,096 "
                                                "tokens' worth when --preset auto sizes a Muon run)", min=1,
                                          metavar="N")
    min_lr_ratio: float = option(0.1, "final learning rate as a fraction of the peak", min=0.0, max=1.0,
                                 metavar="R")
    optimizer: str | None = option(None, "adamw, or muon: torch.optim.Muon on the hidden matrices (its Newton-Schulz "
                                         "iteration in fp32 on CPUs without native bf16), AdamW on the "
                                         "rest (unset: muon where --preset auto sizes a one-process run for a "
                                         "budget that sees the corpus at most 6 times, else adamw)", choices=OPTIMIZERS)
    compile: bool | None = option(None, "torch.compile: the whole model on a GPU, each transformer block on a CPU; "
                                         "unset: on for a one-process bf16 CPU run from 384 wide (1.35-1.4x at 6x384, "
                                         "nothing at 4x192 and below, nor in fp32; 5-25 s to compile) when a C++ "
                                         "compiler is there")
    gradient_checkpointing: bool = option(False, "recompute activations in backward: less memory, slower")
    # speed switches (train/speedups.py); none changes the weights or the saved checkpoint
    fused_loss: bool = option(True, "chunked LM-head cross-entropy: no fp32 copy of the full logits")
    fused_gelu: bool = option(True, "GPT-2 GELU as one fused kernel (the same function)")
    fast_batches: bool = option(True, "micro-batches gathered from the shards, no padding mask")
    cpu_attention: bool = option(True, "CPU, bf16: attention as matmuls, not SDPA")
    flash_attention: bool = option(True, "GPU: FlashAttention 3/2 when installed (flash-attn), else SDPA")
    fp8: bool = option(False, "FP8 matmuls via torchao (Ada/Hopper GPU, --arch llama)")
    # data
    val_fraction: float = option(0.005, "documents held out for validation", min=0.0, max=0.5,
                                 exclusive_min=True, metavar="F")
    num_workers: int = option(0, "DataLoader worker processes", min=0, max=256, metavar="N")

    def validate(self) -> None:
        import torch

        from chatforge.data import read_manifest
        from chatforge.modeling import PRESETS, check_heads

        super().validate()
        if not self.data:
            raise ChatforgeError("pretrain needs --data (a folder, files, hf:NAME or demo)")
        if self.fp8 and (not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9)):
            raise ChatforgeError("--fp8 needs an NVIDIA GPU with FP8 matmuls (compute capability 8.9+: Ada, Hopper)")
        if self.optimizer == "muon" and (self.fsdp or self.deepspeed):  # it orthogonalises whole matrices
            raise ChatforgeError("--optimizer muon needs whole weight matrices on every process: not with --fsdp or "
                                 "--deepspeed")
        # before any folder: the given values with the preset's (a budget-sized run picks its own, so given ones only)
        base = (None,) * 4 if self.init_from or sized_by_budget(self) else PRESETS[resolved_preset(self.preset)]
        check_heads(self.arch, self.d_model or base[1], self.n_head or base[2], self.n_kv_head)
        folders = [f for f in shard_folders(self.data) if f]
        if folders and not self.tokenizer and not self.init_from:  # before any folder
            raise ChatforgeError("--data: shard folders need --tokenizer DIR (the tokenizer they were made with)")
        for folder, _ in folders:  # a manifest chatforge cannot read: said before --out is claimed
            read_manifest(folder)


def shard_folders(data: list[str] = ()) -> list[tuple[str, float] | None]:
    """Each --data spec as (shard folder, weight), or None for a source to prepare; weighted folders
    (DIR:W) mix only with each other."""
    from chatforge.data import MANIFEST
    from chatforge.data.mixture import weighted_folder

    weighted = [weighted_folder(d) for d in data]
    if any(weighted) and not all(weighted):
        raise ChatforgeError("--data: weighted shard folders (DIR:WEIGHT) mix only with each other")
    return [w or ((d, 1.0) if (Path(d) / MANIFEST).is_file() else None) for d, w in zip(data, weighted)]


def micro_batch(cfg: PretrainConfig, context_length: int) -> int:
    """--micro-batch-size, else 32 on a GPU; on a CPU 8, or BUDGET_STEP_TOKENS' worth (32 x 128) in a budget-sized
    run that trains (or, before sizing decides, may train) with Muon: a small model's CPU step is largely fixed
    costs, and bigger steps learned more per token (bench/README.md, "The budget's batch"). AdamW runs, which
    repeat a small corpus many times, keep 8 (measured with 8 there)."""
    import torch

    from chatforge.train.sizing import BUDGET_STEP_TOKENS, fixed_optimizer

    if cfg.micro_batch_size:
        return cfg.micro_batch_size
    if torch.cuda.is_available():
        return 32
    muon = fixed_optimizer(cfg, world_size()) in (None, "muon")
    return max(1, BUDGET_STEP_TOKENS // context_length) if sized_by_budget(cfg) and muon else 8


def resolved_preset(preset: str) -> str:
    import torch

    if preset != "auto":
        return preset
    return "gpt2-small" if torch.cuda.is_available() else "tiny"


def _load_or_train_tokenizer(cfg: PretrainConfig, resume: bool, log):
    """--tokenizer, else --init-from's, else the run's own: kept on --resume, and on --overwrite while it was
    made from the same sources and vocabulary size (else trained again)."""
    from chatforge.outputs import owner_record
    from chatforge.text.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer

    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    if cfg.init_from:
        return load_tokenizer(cfg.init_from)
    tok_dir = str(Path(cfg.out) / "tokenizer")
    record = owner_record(tok_dir)
    same = {k: record.get(k) for k in ("data", "vocab_size", "text_field", "doc_per_line")} == \
        {"data": cfg.data, "vocab_size": cfg.vocab_size, "text_field": cfg.text_field, "doc_per_line": cfg.doc_per_line}
    if (Path(tok_dir) / "tokenizer.json").exists() and (resume or same):
        return load_tokenizer(tok_dir)
    log(f"no --tokenizer given: training a {cfg.vocab_size}-token byte-level BPE on the corpus")
    return train_tokenizer(TokenizerConfig(**asdict(cfg.sources()), out=tok_dir, vocab_size=cfg.vocab_size), log=log)


def _prepare_data(cfg: PretrainConfig, tok, log) -> tuple[list[tuple[str, float]], list[dict]]:
    """Shard folders for this run, with weights, and their manifests: `--data DIR` holding a manifest, or
    `--data DIR:W ...` (a mixture), is used as is; anything else is prepared (cached) into OUT/data."""
    from chatforge.data import DataConfig, prepare, read_manifest
    from chatforge.text.tokenizer import fingerprint

    folders = shard_folders(cfg.data)
    if not all(folders):  # sources to prepare
        folder = str(Path(cfg.out) / "data")
        return [(folder, 1.0)], [prepare(DataConfig(**asdict(cfg.sources()), out=folder,
                                                    val_fraction=cfg.val_fraction), tok=tok, log=log)]
    manifests = [read_manifest(folder) for folder, _ in folders]
    for (folder, _), manifest in zip(folders, manifests):
        if manifest["tokenizer_fingerprint"] != fingerprint(tok):
            raise ChatforgeError(f"{folder}: these shards were made with a different tokenizer; "
                                 "prepare them again with this one")
    return folders, manifests


def _blocks(folders: list[tuple[str, float]], manifests: list[dict], ctx: int, cfg: PretrainConfig, log):
    """(train, val) datasets: one folder's PackedBlocks, or a weighted mixture of several (logged). Validation
    blocks have one length, at most the context: at least one block from each folder with held-out tokens."""
    from chatforge.data import PackedBlocks
    from chatforge.data.mixture import MixtureBlocks

    val_tokens = [m["val"]["tokens"] for m in manifests]
    val_ctx = min([ctx] + [t for t in val_tokens if t])
    vals = [PackedBlocks(f, "val", val_ctx, whole_batches=cfg.fast_batches)
            for (f, _), t in zip(folders, val_tokens) if t]
    if len(folders) == 1:
        return PackedBlocks(folders[0][0], "train", ctx, whole_batches=cfg.fast_batches), (vals or [None])[0]
    parts = [PackedBlocks(f, "train", ctx) for f, _ in folders]
    train = MixtureBlocks(parts, [w for _, w in folders], cfg.seed, whole_batches=cfg.fast_batches)
    val = MixtureBlocks(vals, [len(v) for v in vals], cfg.seed, whole_batches=cfg.fast_batches) if vals else None
    log("data mixture: " + ", ".join(f"{f} {n:,} blocks per epoch ({n / max(1, len(p)):.2f}x its {len(p):,})"
                                     for (f, _), p, n in zip(folders, parts, train.counts)))
    return train, val


def _build_model(cfg: PretrainConfig, tok, log, corpus_tokens: int | None = None):
    """(model, context length, passes a Muon run makes over the corpus in the budget, which decide the
    optimizer: None unless the budget sized the model for a corpus of known size, the optimizer open)."""
    from chatforge.modeling import context_length, load_model, new_model, resolve_shape, set_generation_defaults

    if cfg.init_from:
        model = load_model(cfg.init_from)
        max_positions = context_length(model.config)
        ctx = cfg.context_length or max_positions
        if ctx > max_positions:
            raise ChatforgeError(f"--context-length {ctx} is above the {max_positions} positions of {cfg.init_from}")
        if model.get_input_embeddings().weight.shape[0] < len(tok):
            raise ChatforgeError(f"{cfg.init_from}: the model's vocabulary is smaller than its tokenizer's")
        set_generation_defaults(model, tok)
        return model, ctx, None
    if cfg.model_vocab_size is not None and cfg.model_vocab_size < len(tok):
        raise ChatforgeError(f"--model-vocab-size {cfg.model_vocab_size} is below the tokenizer's {len(tok)} tokens")
    vocab = max(len(tok), cfg.model_vocab_size or 0)
    passes = None
    if sized_by_budget(cfg):
        shape, passes = _shape_for_budget(cfg, tok, vocab, corpus_tokens, log)
    else:
        shape = resolve_shape(cfg.arch, resolved_preset(cfg.preset), vocab, cfg.n_layer, cfg.d_model, cfg.n_head,
                              cfg.n_kv_head, cfg.context_length, cfg.dropout)
    return new_model(shape, tok, seed=cfg.seed), shape.context_length, passes


def sized_by_budget(cfg: PretrainConfig) -> bool:
    """--preset auto with a budget (--max-time or --max-tokens) and no shape option: the budget picks the shape."""
    shape_given = (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.init_from) != (None,) * 5
    return cfg.preset == "auto" and bool(cfg.max_time or cfg.max_tokens) and not shape_given


def _shape_for_budget(cfg: PretrainConfig, tok, vocab: int, corpus_tokens: int | None, log):
    """train/sizing.py: each depth's tokens in the budget (measured here under --max-time; at most
    --max-epochs passes over the corpus), the depth with the lowest predicted loss, capped by the corpus's
    size; rank 0 measures and decides for every process."""
    import dataclasses
    import time

    import torch

    from chatforge.modeling import resolve_precision
    from chatforge.train.common import is_main
    from chatforge.train.sizing import BUDGET_CONTEXT, Budget, pick_depth

    ctx = cfg.context_length or BUDGET_CONTEXT["cuda" if torch.cuda.is_available() else "cpu"]
    shape, passes = None, None
    if is_main():
        budget = Budget(cfg, tok, micro_batch(cfg, ctx), resolve_precision(cfg.precision), ctx, world_size(),
                        corpus_tokens)
        limit = f"--max-time {cfg.max_time:g} s" if cfg.max_time else f"--max-tokens {cfg.max_tokens:,}"
        rule = "the lowest predicted loss (Chinchilla's fit" if cfg.max_time else \
            f"{cfg.tokens_per_param:g} tokens per parameter (--tokens-per-param"
        log(f"--preset auto under {limit}: the depth with {rule}, train/sizing.py)")
        started = time.perf_counter()
        shape = pick_depth(budget.measure, vocab, ctx, cfg.arch,
                           tokens_per_param=None if cfg.max_time else cfg.tokens_per_param,
                           unique_tokens=corpus_tokens, log=log)
        log(f"  -> {shape.n_layer} layers x {shape.d_model} wide, {shape.n_head} heads, context {ctx} (chosen in "
            f"{time.perf_counter() - started:.1f} s, outside the budget)")
        passes = None if budget.fixed_optimizer else budget.muon_passes(shape)  # as Budget.optimizer decided
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [shape]
        torch.distributed.broadcast_object_list(box, src=0)
        shape = box[0]
    return dataclasses.replace(shape, dropout=cfg.dropout), passes


def flops_per_token(model, n_layer: int, d_model: int, seq: int) -> float:
    """Training FLOPs per token: 6·N_matmul + 12·L·d·T (attention scores and values)."""
    n_matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and "wpe" not in n)
    return 6 * n_matmul + 12 * n_layer * d_model * seq


def plan_steps(cfg: PretrainConfig, n_params: int, corpus_tokens: int, tokens_per_step: int) -> int:
    """Optimizer steps: --max-steps, else --max-tokens, else ~20 tokens per parameter (Chinchilla);
    never more than --max-epochs passes over the corpus unless asked for in steps or tokens. Under
    --max-time alone the epoch cap is the plan and the time budget ends the run."""
    cap_steps = max(1, int(cfg.max_epochs * corpus_tokens / tokens_per_step))
    if cfg.max_steps:
        return cfg.max_steps
    if cfg.max_tokens:
        return math.ceil(cfg.max_tokens / tokens_per_step)
    if cfg.max_time:
        return cap_steps
    return min(cap_steps, max(1, math.ceil(cfg.tokens_per_param * n_params / tokens_per_step)))


def default_learning_rate(optimizer: str, n_params: int, tokens_per_step: int, gpu: bool = False) -> float:
    """AdamW: 1e-3 below 50M parameters, else 6e-4. Muon (match_rms_adamw): 6x that at 1,024-token steps, on a CPU
    times the square root of the batch up to 4,096 tokens, the range measured (bench/README.md, "With the
    schedule reaching Muon" and "The budget's batch"). No rate was measured on a GPU, whose batches are far
    larger: it keeps 6x."""
    lr = 1e-3 if n_params < 50e6 else 6e-4
    if optimizer != "muon":
        return lr
    return 6 * lr * (1.0 if gpu else math.sqrt(min(4.0, max(1.0, tokens_per_step / 1024))))


def pretrain(cfg: PretrainConfig, resume: bool = False, overwrite: bool = False, log=print,
             callbacks: tuple = ()) -> dict:
    """Run (or resume) pretraining; returns the run summary. `callbacks`: extra TrainerCallbacks (benches)."""
    quiet_optional_imports()
    import torch
    from accelerate import PartialState

    from chatforge import config as config_io
    from chatforge.data import collate_blocks
    from chatforge.modeling import count_parameters, resolve_precision
    from chatforge.outputs import check_not_inputs, claim
    from chatforge.train.callbacks import Throughput
    from chatforge.train.common import RUN_CONFIG, Plan, finish_run, is_main, run_trainer
    from chatforge.train.sizing import accumulation, budget_optimizer
    from chatforge.train.speedups import apply_speedups, compile_by_default, restore_forward

    cfg.validate()
    keep = ("data", "tokenizer")  # shards and tokenizer a run made are reused by --overwrite
    data = [folder[0] if folder else d for d, folder in zip(cfg.data, shard_folders(cfg.data))]  # DIR:W -> DIR
    check_not_inputs(cfg.out, [("--data", d) for d in data] + [("--tokenizer", cfg.tokenizer),
                                                                    ("--init-from", cfg.init_from)], keep=keep)
    state = PartialState()
    # the tokenizer, the data and the model are checked only as they are made, into --out: until training starts,
    # a run that --overwrite replaces waits aside, and a failure puts it back (or removes a folder made for it)
    claimed = claim(cfg.out, "pretrain", overwrite=overwrite, resume=resume, keep=keep, set_aside=True) \
        if is_main() else None
    try:
        with state.main_process_first():  # rank 0 trains the tokenizer and writes shards; others reuse them
            tok = _load_or_train_tokenizer(cfg, resume, log)
            folders, manifests = _prepare_data(cfg, tok, log)
        model, ctx, passes = _build_model(cfg, tok, log, corpus_tokens=sum(m["train"]["tokens"] for m in manifests))
        if cfg.optimizer is None:  # decided here, on a copy; run_config.yaml keeps the decision for --resume
            cfg = replace(cfg, optimizer=budget_optimizer(passes, world_size(), log if is_main() else lambda *_: None))
        precision = resolve_precision(cfg.precision)
        n_params = count_parameters(model)

        train, val = _blocks(folders, manifests, ctx, cfg, log if is_main() else lambda *_: None)
        if len(train) == 0:
            raise ChatforgeError(f"{', '.join(cfg.data)}: {sum(m['train']['tokens'] for m in manifests)} training "
                                 f"tokens is less than one block of --context-length {ctx}")
        micro = min(micro_batch(cfg, ctx), len(train))
        per_pass = micro * ctx * world_size()
        accum = accumulation(cfg.batch_tokens, per_pass)
        tokens_per_step = per_pass * accum
        corpus_tokens = len(train) * ctx
        max_steps = plan_steps(cfg, n_params, corpus_tokens, tokens_per_step)
        lr = cfg.learning_rate or default_learning_rate(cfg.optimizer, n_params, tokens_per_step,
                                                        gpu=torch.cuda.is_available())
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(200, max(1, max_steps // 20))
        plan = Plan(max_steps, micro, accum, lr, warmup, precision, cfg.min_lr_ratio, cfg.optimizer)
        d_model = getattr(model.config, "n_embd", None) or model.config.hidden_size
        n_layer = getattr(model.config, "n_layer", None) or model.config.num_hidden_layers
        if cfg.compile is None:  # decided here, on a copy; run_config.yaml keeps the decision for --resume
            cfg = replace(cfg, compile=compile_by_default(d_model, world_size() == 1, precision))
        if is_main():
            shape = {"n_layer": n_layer, "d_model": d_model, "n_head": model.config.num_attention_heads} \
                if sized_by_budget(cfg) else {}  # so that --resume builds the same model without measuring again
            own_tokenizer = str(Path(cfg.out) / "tokenizer")
            resolved = PretrainConfig(**{**asdict(cfg), "preset": resolved_preset(cfg.preset), **shape,
                                         "tokenizer": cfg.tokenizer or cfg.init_from or own_tokenizer,
                                         "context_length": ctx, "micro_batch_size": micro,
                                         "batch_tokens": tokens_per_step, "learning_rate": lr, "warmup_steps": warmup,
                                         "max_steps": max_steps})
            config_io.save(resolved, Path(cfg.out) / RUN_CONFIG)
            log(f"model: {cfg.arch if not cfg.init_from else cfg.init_from} {n_params / 1e6:.2f}M parameters, "
                f"context {ctx}; {precision}, {cfg.optimizer} at lr {lr:g}; {max_steps} steps x "
                f"{tokens_per_step:,} tokens "
                f"(micro-batch {micro} x accumulation {accum} x {world_size()} process(es)); "
                f"corpus {corpus_tokens:,} tokens = {max_steps * tokens_per_step / corpus_tokens:.2f} epochs")
    except BaseException:
        if claimed:
            claimed.undo()
        raise
    if claimed:
        claimed.commit()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    apply_speedups(model, cfg, precision, log=log if is_main() else lambda *_: None)
    val_tokens, val_bytes = (sum(m["val"][k] for m in manifests) for k in ("tokens", "bytes"))
    throughput = Throughput(tokens_per_step, val_tokens / max(1, val_bytes),
                            flops_per_token(model, n_layer, d_model, ctx), _peak_flops())
    trainer, metrics = run_trainer(
        cfg, cfg.out, model, tok, train, val, plan, kind="pretrain", throughput=throughput,
        # stock: DataCollatorWithPadding, which pads in Python and adds an all-ones mask
        collator=collate_blocks if cfg.fast_batches else None, num_workers=cfg.num_workers,
        compile=cfg.compile and torch.cuda.is_available(),  # on a CPU apply_speedups compiled the blocks
        resume=resume, log=log, callbacks=callbacks)
    restore_forward(model)  # the stock forward (logits) for whoever uses the model object next
    trainer.save_model(cfg.out)
    # the final evaluate() was logged, so Throughput's summary already carries its ppl and bits per byte
    summary = {**throughput.summary(trainer.state), **metrics, "parameters": n_params}
    del trainer, model  # before the process group goes: see finish_distributed
    return finish_run(cfg.out, summary, f"done: {summary.get('steps')} steps, {summary.get('tokens_per_s')} tokens/s, "
                      f"val loss {summary.get('eval_loss')}, bits/byte {summary.get('eval_bpb')} -> {cfg.out}", log)


def _peak_flops() -> float | None:
    """Dense bf16 datasheet peak of the GPU, for MFU; None on CPU (tokens/s only)."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().lower()
    # the PCIe / NVL boards run lower clocks than the SXM ones of the same name: matched first
    for key, peak in (("h100 pcie", 756e12), ("nvl", 835e12), ("h200", 989e12), ("h100", 989e12),
                      ("a100", 312e12), ("l40s", 362e12), ("l40", 181e12),
                      ("4090", 165e12), ("a10", 125e12), ("3090", 71e12), ("t4", 65e12)):
        if key in name:
            return peak
    return None
