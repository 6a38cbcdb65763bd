"""Stage 4: pretrain a GPT from scratch with the transformers `Trainer` (causal LM, never masked LM).

Pipeline: tokenizer (trained if none given) -> packed shards (prepared once, cached) -> a stock
GPT2LMHeadModel / LlamaForCausalLM from a size preset -> Trainer with AdamW, warm-up + cosine/WSD,
clipping, accumulation to a batch measured in tokens, bf16 where the hardware has it -> a standard
Hugging Face directory in `out/` (checkpoints in `out/checkpoint-N/`, resumable).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from chatforge.errors import ChatforgeError
from chatforge.training import RunSettings


@dataclass
class PretrainConfig(RunSettings):
    """Everything that defines a pretraining run; saved as out/run_config.yaml."""

    data: list[str] = field(default_factory=list)
    out: str = "run"
    tokenizer: str | None = None      # a tokenizer directory; trained on `data` when not given
    vocab_size: int = 8192            # for the tokenizer trained when none is given
    # model
    arch: str = "gpt2"
    preset: str = "auto"              # auto: tiny on CPU, gpt2-small on GPU
    n_layer: int | None = None
    d_model: int | None = None
    n_head: int | None = None
    n_kv_head: int | None = None
    context_length: int | None = None
    dropout: float = 0.0
    model_vocab_size: int | None = None  # embedding rows if more than the tokenizer's (GPT-2: 50304): room to add tokens
    init_from: str | None = None      # continue pretraining a local Hugging Face checkpoint
    # budget: max_steps > max_tokens > compute-aware default; max_time caps any of them. Learning rate
    # auto: 1e-3 below 50M parameters, else 6e-4; warm-up auto: 5% of steps, at most 200
    max_tokens: int | None = None
    tokens_per_param: float = 20.0
    max_epochs: float = 10.0
    # optimisation
    batch_tokens: int | None = None   # tokens per optimizer step; gradient accumulation makes it up
    micro_batch_size: int | None = None
    min_lr_ratio: float = 0.1
    compile: bool = False
    gradient_checkpointing: bool = False
    # speed switches (chatforge/fastloss.py); none changes the weights or the saved checkpoint
    fused_loss: bool = True           # chunked LM-head cross-entropy: no fp32 copy of the full logits
    fused_gelu: bool = True           # GPT-2's op-by-op tanh GELU -> torch's fused GELU (same function)
    fast_batches: bool = True         # whole micro-batches gathered from the memmapped shards, no mask
    cpu_attention: bool = True        # CPU bf16: causal attention as matmuls + softmax (SDPA's kernel is slower)
    flash_attention: bool = True      # GPU: FlashAttention 3 (Hopper) or 2 when installed, else SDPA
    fp8: bool = False                 # GPU (FP8-capable): torchao FP8 matmuls in nn.Linear layers (Llama-style)
    # data
    val_fraction: float = 0.005
    text_field: str = "text"
    doc_per_line: bool = False
    strict: bool = False
    num_workers: int = 0


def _default_preset() -> str:
    import torch

    return "gpt2-small" if torch.cuda.is_available() else "tiny"


def _load_or_train_tokenizer(cfg: PretrainConfig, log):
    from chatforge.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer

    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    if cfg.init_from:
        return load_tokenizer(cfg.init_from)
    tok_dir = str(Path(cfg.out) / "tokenizer")
    if (Path(tok_dir) / "tokenizer.json").exists():
        return load_tokenizer(tok_dir)
    log(f"no --tokenizer given: training a {cfg.vocab_size}-token byte-level BPE on the corpus")
    return train_tokenizer(TokenizerConfig(data=cfg.data, out=tok_dir, vocab_size=cfg.vocab_size,
                                           text_field=cfg.text_field, doc_per_line=cfg.doc_per_line,
                                           strict=cfg.strict), log=log)


def _prepare_data(cfg: PretrainConfig, tok, log) -> tuple[str, dict]:
    """Shards for this run: `--data DIR` holding a manifest is used as is, otherwise prepared (cached)."""
    from chatforge.data import MANIFEST, DataConfig, prepare, read_manifest
    from chatforge.tokenizer import fingerprint

    if len(cfg.data) == 1 and (Path(cfg.data[0]) / MANIFEST).exists():
        folder = cfg.data[0]
        manifest = read_manifest(folder)
        if manifest["tokenizer_fingerprint"] != fingerprint(tok):
            raise ChatforgeError(f"{folder}: these shards were made with a different tokenizer; "
                                 "prepare them again with this one")
        return folder, manifest
    folder = str(Path(cfg.out) / "data")
    manifest = prepare(DataConfig(data=cfg.data, out=folder, val_fraction=cfg.val_fraction,
                                  text_field=cfg.text_field, doc_per_line=cfg.doc_per_line,
                                  strict=cfg.strict), tok=tok, log=log)
    return folder, manifest


def _build_model(cfg: PretrainConfig, tok, log):
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
        return model, ctx
    if cfg.model_vocab_size is not None and cfg.model_vocab_size < len(tok):
        raise ChatforgeError(f"--model-vocab-size {cfg.model_vocab_size} is below the tokenizer's {len(tok)} tokens")
    shape = resolve_shape(cfg.arch, cfg.preset, max(len(tok), cfg.model_vocab_size or 0), cfg.n_layer, cfg.d_model,
                          cfg.n_head, cfg.n_kv_head, cfg.context_length, cfg.dropout)
    return new_model(shape, tok, seed=cfg.seed), shape.context_length


def flops_per_token(model, n_layer: int, d_model: int, seq: int) -> float:
    """Training FLOPs per token: 6·N_matmul + 12·L·d·T (attention scores and values)."""
    n_matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and "wpe" not in n)
    return 6 * n_matmul + 12 * n_layer * d_model * seq


def pretrain(cfg: PretrainConfig, resume: bool = False, overwrite: bool = False, log=print,
             callbacks: tuple = ()) -> dict:
    """Run (or resume) pretraining; returns the run summary. `callbacks`: extra TrainerCallbacks (benches)."""
    import torch
    from accelerate import PartialState
    from transformers import Trainer

    from chatforge import config as config_io
    from chatforge.data import PackedBlocks
    from chatforge.fastloss import (BlockBatches, collate_blocks, flash_attention_implementation, fuse_gelu,
                                    restore_forward, use_cpu_attention, use_fp8, use_fused_loss, use_packed_sdpa)
    from chatforge.modeling import count_parameters, resolve_precision
    from chatforge.training import (RUN_CONFIG, CompleteMarker, Schedule, Throughput, WallClockBudget, add_callbacks,
                                    check_output_dir, finish_distributed, make_optimizer, resume_checkpoint,
                                    training_arguments, world_size, write_summary)

    if not cfg.data:
        raise ChatforgeError("pretrain needs --data (a folder, files, hf:NAME or demo)")
    if cfg.preset == "auto":
        cfg.preset = _default_preset()
    if cfg.fp8 and (not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9)):
        raise ChatforgeError("--fp8 needs an NVIDIA GPU with FP8 matmuls (compute capability 8.9+: Ada, Hopper)")
    state = PartialState()
    if state.is_main_process:
        check_output_dir(cfg.out, resume, overwrite, keep=("data", "tokenizer"))
    with state.main_process_first():  # rank 0 trains the tokenizer and writes shards; others reuse them
        tok = _load_or_train_tokenizer(cfg, log)
        data_dir, manifest = _prepare_data(cfg, tok, log)
    model, ctx = _build_model(cfg, tok, log)
    precision = resolve_precision(cfg.precision)
    n_params = count_parameters(model)

    blocks = BlockBatches if cfg.fast_batches else PackedBlocks
    train = blocks(data_dir, "train", ctx)
    val_tokens = manifest["val"]["tokens"]
    val = blocks(data_dir, "val", min(ctx, val_tokens))
    if len(train) == 0:
        raise ChatforgeError(f"{', '.join(cfg.data)}: {manifest['train']['tokens']} training tokens is less "
                             f"than one block of --context-length {ctx}")
    micro = cfg.micro_batch_size or (32 if torch.cuda.is_available() else 8)
    micro = min(micro, len(train))
    per_pass = micro * ctx * world_size()
    accum = max(1, round((cfg.batch_tokens or per_pass) / per_pass))
    tokens_per_step = per_pass * accum
    corpus_tokens = len(train) * ctx
    cap_steps = max(1, int(cfg.max_epochs * corpus_tokens / tokens_per_step))
    if cfg.max_steps:
        max_steps = cfg.max_steps
    elif cfg.max_tokens:
        max_steps = math.ceil(cfg.max_tokens / tokens_per_step)
    elif cfg.max_time:
        max_steps = cap_steps
    else:  # compute-aware: ~20 tokens per parameter (Chinchilla), capped by corpus size x epoch limit
        max_steps = min(cap_steps, max(1, math.ceil(cfg.tokens_per_param * n_params / tokens_per_step)))
    lr = cfg.learning_rate or (1e-3 if n_params < 50e6 else 6e-4)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(200, max(1, max_steps // 20))
    resolved = PretrainConfig(**{**asdict(cfg), "tokenizer": cfg.tokenizer or cfg.init_from or str(Path(cfg.out) / "tokenizer"),
                                 "context_length": ctx, "micro_batch_size": micro, "batch_tokens": tokens_per_step,
                                 "learning_rate": lr, "warmup_steps": warmup, "max_steps": max_steps})
    if state.is_main_process:
        config_io.save(resolved, Path(cfg.out) / RUN_CONFIG)
        log(f"model: {cfg.arch if not cfg.init_from else cfg.init_from} {n_params / 1e6:.2f}M parameters, "
            f"context {ctx}; {precision}; {max_steps} steps x {tokens_per_step:,} tokens "
            f"(micro-batch {micro} x accumulation {accum} x {world_size()} process(es)); "
            f"corpus {corpus_tokens:,} tokens = {max_steps * tokens_per_step / corpus_tokens:.2f} epochs")

    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    # before the Trainer wraps model.forward (autocast, DDP), so the wrappers apply to the fast forward
    if cfg.fused_gelu:
        fuse_gelu(model)
    if cfg.fused_loss:
        use_fused_loss(model)
    # bf16 only: in fp32 the matmul path is slower than SDPA's kernel (measured: 48 vs 35 ms per layer)
    if cfg.cpu_attention and precision == "bf16" and not cfg.compile and not torch.cuda.is_available():
        use_cpu_attention(model)
    flash = flash_attention_implementation() if cfg.flash_attention and precision in ("bf16", "fp16") else None
    if flash:
        model.set_attn_implementation(flash)
        log(f"attention: {flash}")
    elif cfg.fast_batches and model.config._attn_implementation == "sdpa":
        use_packed_sdpa(model)
    if cfg.fp8:
        converted = use_fp8(model)
        if not converted:
            raise ChatforgeError("--fp8: the model has no nn.Linear layer to convert (GPT-2's layers are "
                                 "Conv1D: use --arch llama)")
        log(f"fp8: {converted} linear layers run FP8 matmuls (torchao)")
    optimizer = make_optimizer(model, lr, cfg.weight_decay)
    schedule = Schedule(cfg.schedule, warmup, max_steps, cfg.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    args = training_arguments(cfg, cfg.out, max_steps=max_steps, micro=micro, accum=accum, precision=precision,
                              has_eval=len(val) > 0, compile=cfg.compile, num_workers=cfg.num_workers)
    d_model = getattr(model.config, "n_embd", None) or model.config.hidden_size
    n_layer = getattr(model.config, "n_layer", None) or model.config.num_hidden_layers
    throughput = Throughput(tokens_per_step, manifest["val"]["tokens"] / max(1, manifest["val"]["bytes"]),
                            flops_per_token(model, n_layer, d_model, ctx), _peak_flops())
    callbacks = [throughput, CompleteMarker({"kind": "pretrain"}), *callbacks]
    if cfg.max_time:
        callbacks.append(WallClockBudget(cfg.max_time, schedule))
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val if len(val) else None,
                      processing_class=tok, optimizers=(optimizer, scheduler),
                      # stock: DataCollatorWithPadding, which pads in Python and adds an all-ones mask
                      data_collator=collate_blocks if cfg.fast_batches else None)
    add_callbacks(trainer, callbacks)
    checkpoint = resume_checkpoint(cfg.out, log) if resume else None
    trainer.train(resume_from_checkpoint=checkpoint)
    metrics = trainer.evaluate() if len(val) else {}
    restore_forward(model)  # the stock forward (logits) for whoever uses the model object next
    trainer.save_model(cfg.out)
    # the final evaluate() was logged, so Throughput's summary already carries its ppl and bits per byte
    summary = {**throughput.summary(trainer.state), **{k: round(v, 4) for k, v in metrics.items()
                                                       if isinstance(v, float)}, "parameters": n_params}
    if state.is_main_process:
        write_summary(cfg.out, summary)
        log(f"done: {summary.get('steps')} steps, {summary.get('tokens_per_s')} tokens/s, "
            f"val loss {summary.get('eval_loss')}, bits/byte {summary.get('eval_bpb')} -> {cfg.out}")
    del trainer, model  # before the process group goes: see finish_distributed
    finish_distributed()
    return summary


def _peak_flops() -> float | None:
    """Dense bf16 datasheet peak of the GPU, for MFU; None on CPU (tokens/s only)."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().lower()
    for key, peak in (("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("l40", 181e12),
                      ("4090", 165e12), ("a10", 125e12), ("3090", 71e12), ("t4", 65e12)):
        if key in name:
            return peak
    return None
