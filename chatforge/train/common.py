"""What every training stage shares around the transformers `Trainer`: one set-up and one finish.

The Trainer does the loop, accumulation, clipping, mixed precision, DDP, checkpointing and resume.
chatforge adds what it lacks: precision picked from the hardware, an optimizer that decays only
matrices, a schedule whose length can follow a wall-clock budget, checkpoints that are marked complete
only once fully written, a progress bar with tokens/s, and output folders that are provably its own.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from chatforge.config import option
from chatforge.errors import ChatforgeError, transformers_quiet
from chatforge.modeling import PRECISIONS
from chatforge.outputs import CHECKPOINT_COMPLETE as COMPLETE_MARKER
from chatforge.outputs import CHECKPOINT_STARTED as STARTED_MARKER

RUN_CONFIG = "run_config.yaml"
SUMMARY = "summary.json"
SCHEDULES = ("cosine", "wsd", "constant")
REPORTERS = ("tensorboard", "wandb", "mlflow", "trackio", "swanlab", "none")


@dataclass
class RunSettings:
    """What every training stage shares: budget, optimisation, precision and bookkeeping. Stages extend
    it and may change a default with `redefault`."""

    max_steps: int | None = option(None, "stop after N optimizer steps", min=1, metavar="N")
    max_time: float | None = option(None, "a time budget in seconds, across --resume; the LR schedule is fitted "
                                          "to it", min=0.0, exclusive_min=True, metavar="SECONDS")
    learning_rate: float | None = option(None, "peak learning rate (auto: per stage, model size and optimizer; "
                                               "Muon's on a CPU also by the batch)", min=0.0,
                                         exclusive_min=True, max=10.0, metavar="LR")
    warmup_steps: int | None = option(None, "linear warm-up steps (auto: a few % of the run)", min=0, metavar="N")
    schedule: str = option("cosine", "learning-rate schedule after warm-up", choices=SCHEDULES)
    weight_decay: float = option(0.1, "AdamW weight decay on matrices", min=0.0, max=10.0, metavar="W")
    grad_clip: float = option(1.0, "clip the gradient norm to this (0 = off)", min=0.0, metavar="NORM")
    precision: str = option("auto", "auto: bf16 where supported, else fp32", choices=PRECISIONS)
    eval_every: int = option(200, "evaluate every N steps", min=1, metavar="STEPS")
    save_every: int = option(500, "save a checkpoint every N steps", min=1, metavar="STEPS")
    save_total_limit: int = option(2, "checkpoints kept", min=1, metavar="N")
    log_every: int = option(10, "log every N steps", min=1, metavar="STEPS")
    seed: int = option(1337, "random seed (initialisation, data order)", min=0, max=2**32 - 1)
    report_to: list[str] = option(["tensorboard"], "where to log, repeatable", choices=REPORTERS, metavar="TOOL")
    fsdp: bool = option(False, "shard parameters, gradients and optimizer state across the processes (FSDP2; "
                               "launch with torchrun)")
    fsdp_offload: bool = option(False, "with --fsdp: keep parameters and optimizer state in CPU memory")
    deepspeed: str | None = option(None, "shard with DeepSpeed: its JSON config (ZeRO-2/3 in examples/)",
                                   metavar="FILE")

    def validate(self) -> None:
        from chatforge.train.sharding import check_sharding

        check_sharding(self)


def redefault(cls, name: str, value):
    """The field `name` of `cls` with another default, for a subclass: declared once, help included."""
    meta = dict(cls.__dataclass_fields__[name].metadata)
    return option(value, **meta)


@dataclass
class FineTuneSettings(RunSettings):
    """What the stages that start from a trained model share (sft, dpo): batches, held-out data, LoRA."""

    eval_fraction: float = option(0.05, "examples held out for evaluation (0 = none)", min=0.0, max=0.5,
                                  metavar="F")
    epochs: float = option(3.0, "passes over the data", min=0.0, exclusive_min=True, metavar="N")
    micro_batch_size: int = option(8, "examples per forward pass", min=1, metavar="N")
    grad_accum: int = option(1, "micro-batches per optimizer step", min=1, metavar="N")
    weight_decay: float = redefault(RunSettings, "weight_decay", 0.0)
    lora: bool = option(False, "train LoRA adapters (PEFT) instead of all weights")
    lora_r: int = option(16, "LoRA rank", min=1, max=4096, metavar="R")
    lora_alpha: int = option(32, "LoRA scaling numerator", min=1, metavar="A")
    merge: bool = option(False, "with --lora: write merged full weights")
    strict: bool = option(False, "fail on the first unusable record")

    def validate(self) -> None:
        super().validate()
        if self.merge and not self.lora:
            raise ChatforgeError("--merge merges LoRA adapters into the weights: it needs --lora")


def check_model_dir(model: str, stage: str, what: str) -> None:
    """A fine-tuning stage's --model: given, and a folder (checked in validate, before any output folder)."""
    if not model:
        raise ChatforgeError(f"{stage} needs --model MODEL_DIR ({what})")
    if not Path(model).is_dir():
        raise ChatforgeError(f"--model {model}: model directory not found")


def is_main() -> bool:
    """The one rank-0 test: torchrun (and accelerate) set RANK; a single process is rank 0."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# ---------------------------------------------------------------- checkpoints


def checkpoint_step(path: Path) -> int | None:
    tail = path.name.split("-")[-1]
    return int(tail) if path.name.startswith("checkpoint-") and tail.isdigit() else None


def complete_checkpoints(out: str) -> list[Path]:
    """Checkpoints whose save finished (marker written last), oldest first."""
    found = [p for p in Path(out).glob("checkpoint-*") if (p / COMPLETE_MARKER).exists() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def resume_checkpoint(out: str, log=print) -> str | None:
    """The newest complete checkpoint. Ours that a kill left incomplete are removed first (a checkpoint
    folder chatforge did not start was refused by `outputs.claim` before any work, and is never deleted)."""
    for ckpt in sorted(Path(out).glob("checkpoint-*")):
        if (ckpt / STARTED_MARKER).exists() and not (ckpt / COMPLETE_MARKER).exists() and is_main():
            log(f"removing incomplete checkpoint {ckpt}")
            shutil.rmtree(ckpt, ignore_errors=True)
    done = complete_checkpoints(out)
    if not done:
        log(f"{out}: no complete checkpoint to resume from; starting from scratch")
        return None
    log(f"resuming from {done[-1]}")
    return str(done[-1])


def trained_seconds(checkpoint: str | None) -> float:
    """Training time spent up to `checkpoint` (0 for a fresh run)."""
    if checkpoint is None:
        return 0.0
    try:
        return float(json.loads((Path(checkpoint) / COMPLETE_MARKER).read_text()).get("train_seconds", 0.0))
    except (OSError, ValueError):
        return 0.0


# ---------------------------------------------------------------- optimizer and schedule


OPTIMIZERS = ("adamw", "muon")


def make_optimizer(model, lr: float, weight_decay: float, betas=(0.9, 0.95), kind: str = "adamw"):
    """AdamW with weight decay on matrices only (not biases, norms); fused kernel where available. `muon`:
    torch.optim.Muon on the hidden matrices (attention and MLP), at the learning rate whose update size
    matches AdamW's (`match_rms_adamw`), and AdamW on the embeddings, the LM head, biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    hidden: list = []
    if kind == "muon":
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        head = model.get_output_embeddings()
        embeddings |= {id(head.weight)} if head is not None else set()
        hidden = [p for p in params if p.dim() == 2 and id(p) not in embeddings]
    chosen = {id(p) for p in hidden}
    rest = [p for p in params if id(p) not in chosen]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    try:
        adamw = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError):  # fused AdamW unsupported for this device/dtype
        adamw = torch.optim.AdamW(groups, lr=lr, betas=betas)
    if not hidden:
        return adamw
    from chatforge.modeling import cpu_has_bf16

    muon = torch.optim.Muon if hidden[0].device.type != "cpu" or cpu_has_bf16() else Fp32Muon
    return OptimizerChain(muon(hidden, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"), adamw)


class Fp32Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz iteration in fp32 instead of bf16, for CPUs without native bf16
    matmuls, where torch's bf16 iteration is emulated: 26x slower at width 128 on an AMD EPYC Zen 3 (243 vs 9.3 ms
    for a layer's four matrices, bench/README.md). Same coefficients, steps, learning-rate rule and state (a
    momentum buffer per matrix): checkpoints load into either class; updates differ by bf16 rounding only."""

    @torch.no_grad()
    def step(self, closure=None):
        from torch.optim._muon import _adjust_lr

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            lr, momentum, (a, b, c) = group["lr"], group["momentum"], group["ns_coefficients"]
            for param, grad, buffer in zip(params, grads, buffers):
                buffer.lerp_(grad, 1 - momentum)
                x = (grad.lerp(buffer, momentum) if group["nesterov"] else buffer).float()
                tall = x.shape[0] > x.shape[1]
                x = x.T if tall else x
                x = x / x.norm().clamp(min=group["eps"])
                for _ in range(group["ns_steps"]):
                    gram = x @ x.T
                    x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
                param.mul_(1 - lr * group["weight_decay"])
                step_size = _adjust_lr(lr, group["adjust_lr_fn"], param.shape)
                param.add_((x.T if tall else x).to(param.dtype), alpha=-step_size)
        return loss


class OptimizerChain(torch.optim.Optimizer):
    """Optimizers over disjoint parameters, stepped as one: a single object for the Trainer and the LR
    scheduler, which share the inner optimizers' parameter groups (a schedule scales all of them alike)."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers
        super().__init__([group for opt in optimizers for group in opt.param_groups], {})

    def step(self, closure=None):
        loss = closure() if closure is not None else None  # each optimizer steps without autograd itself
        for opt in self.optimizers:
            opt.step()
        return loss

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        for opt, state in zip(self.optimizers, state_dict["optimizers"], strict=True):
            opt.load_state_dict(state)
        # loading gives each optimizer new group dicts: share those, or a schedule would scale stale copies
        # (accelerate loads the state right after the Trainer made its scheduler: no warm-up, no decay)
        self.param_groups[:] = [group for opt in self.optimizers for group in opt.param_groups]


class Schedule:
    """Warm-up then cosine (to `min_lr_ratio`) or warm-up-stable-decay (WSD, linear decay over the last
    `decay_fraction`). `total_steps` is mutable so a wall-clock budget can shorten the plan mid-run."""

    def __init__(self, kind: str, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1,
                 decay_fraction: float = 0.2):
        if kind not in ("cosine", "wsd", "constant"):
            raise ChatforgeError(f"--schedule must be cosine, wsd or constant, got {kind!r}")
        self.kind, self.warmup_steps, self.total_steps = kind, warmup_steps, total_steps
        self.min_lr_ratio, self.decay_fraction = min_lr_ratio, decay_fraction

    def __call__(self, step: int) -> float:
        if step >= max(self.total_steps, 1):  # resumed at its last step, the Trainer runs one more: a no-op
            return 0.0
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        total = max(self.total_steps, self.warmup_steps + 1)
        if self.kind == "cosine":
            progress = min(1.0, (step - self.warmup_steps) / (total - self.warmup_steps))
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        decay_start = total - int(self.decay_fraction * total)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
        return 1.0 - (1.0 - self.min_lr_ratio) * progress


# ---------------------------------------------------------------- the Trainer, set up and finished once


@dataclass
class Plan:
    """A stage's resolved budget and batch, what `run_trainer` needs besides the model and data."""

    max_steps: int
    micro: int
    accum: int
    learning_rate: float
    warmup: int
    precision: str
    min_lr_ratio: float = 0.1
    optimizer: str = "adamw"


def run_trainer(cfg: RunSettings, out: str, model, tok, train, evals, plan: Plan, *, kind: str, throughput,
                collator=None, compile: bool = False, num_workers: int = 0, resume: bool = False, log=print,
                callbacks: tuple = (), trainer_class=None, args_class=None, args_extra: dict | None = None,
                trainer_extra: dict | None = None):
    """Train with the transformers Trainer (AdamW, schedule, markers, budget) and evaluate; returns
    (trainer, final eval metrics). `callbacks`: extra TrainerCallbacks (benches). A TRL stage passes its
    trainer and config classes (they extend Trainer and TrainingArguments) and their own options."""
    from transformers import Trainer
    from transformers.trainer_callback import ProgressCallback

    from chatforge.train.callbacks import CompleteMarker, WallClockBudget
    from chatforge.train.sharding import check_resume, chatforge_trainer, sharding_arguments

    say = log if is_main() else lambda *_: None
    schedule = Schedule(cfg.schedule, plan.warmup, plan.max_steps, plan.min_lr_ratio)
    sharding = sharding_arguments(cfg, world_size(), say)
    checkpoint = resume_checkpoint(out, say) if resume else None
    spent = trained_seconds(checkpoint)
    finished = checkpoint is not None and (checkpoint_step(Path(checkpoint)) >= plan.max_steps
                                           or bool(cfg.max_time) and spent >= cfg.max_time)
    if finished and (Path(out) / SUMMARY).exists():
        raise ChatforgeError(f"--out {out}: the run finished (its steps or --max-time); nothing to resume (to train "
                             "further, start a new run from it)")
    check_resume(checkpoint, sharding)
    args = training_arguments(cfg, out, max_steps=plan.max_steps, micro=plan.micro, accum=plan.accum,
                              precision=plan.precision, has_eval=bool(evals) and len(evals) > 0, compile=compile,
                              num_workers=num_workers, args_class=args_class, **sharding, **(args_extra or {}))
    if collator is not None:  # TRL's GRPOTrainer takes none: it batches its own generations
        trainer_extra = {"data_collator": collator, **(trainer_extra or {})}
    trainer = chatforge_trainer(trainer_class or Trainer)(
        model=model, args=args, train_dataset=train, eval_dataset=evals if evals and len(evals) else None,
        processing_class=tok,
        make_optimizer=lambda m: make_optimizer(m, plan.learning_rate, cfg.weight_decay, kind=plan.optimizer),
        make_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule), **(trainer_extra or {}))
    ours = [throughput, *callbacks]
    if cfg.max_time:
        if spent:
            say(f"--max-time: {spent:.0f} of {cfg.max_time:g} s already spent before this resume")
        progress = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ProgressCallback)), None)
        ours.append(WallClockBudget(max(cfg.max_time - spent, 0.0), schedule, progress=progress))
    for cb in reversed(ours):  # first, so TensorBoard and the progress bar see the metrics they add to the logs
        trainer.callback_handler.callbacks.insert(0, cb)
    marker = CompleteMarker({"kind": kind}, spent, keep=cfg.save_total_limit)
    trainer.add_callback(marker)  # last: after the Trainer decided to save
    if finished:  # killed after its last checkpoint, before the final save: the Trainer would count a step it
        from transformers import TrainerState  # does not take and save a checkpoint past the end

        say(f"{out}: its {plan.max_steps} steps are done; saving the final model")
        with transformers_quiet():  # "missing lm_head.weight": tied to the embedding, which it loads
            trainer._load_from_checkpoint(checkpoint)
        trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
        throughput.start_step, throughput.train_start = trainer.state.global_step, time.time()  # no rate measured
    else:
        trainer.train(resume_from_checkpoint=checkpoint)
    metrics = trainer.evaluate() if args.eval_strategy != "no" else {}
    return trainer, {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}


def finish_run(out: str, summary: dict, message: str, log=print) -> dict:
    """Write summary.json (rank 0), say `message`, and tear down the process group."""
    if is_main():
        Path(out, SUMMARY).write_text(json.dumps(summary, indent=2))
        log(message)
    finish_distributed()
    return summary


def finish_distributed() -> None:
    """Tear the process group down: gloo aborts a process that exits with it still up.

    Callers drop their Trainer first, so the DDP reducer (which holds the group) is collected here,
    while the group is alive: freed after `destroy_process_group` instead, its destructor joins gloo's
    worker thread while holding the GIL that thread is waiting for, and the process hangs. No barrier
    either: its work object, released on gloo's thread, races the same way.
    """
    import gc

    gc.collect()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def training_arguments(cfg: RunSettings, out: str, *, max_steps: int, micro: int, accum: int, precision: str,
                       has_eval: bool, compile: bool = False, num_workers: int = 0, args_class=None, **extra):
    """The TrainingArguments every stage uses (or `args_class`, a subclass, with its `extra` options);
    TensorBoard logs go to out/logs."""
    from transformers import TrainingArguments

    os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(out) / "logs")
    options = dict(
        output_dir=out, max_steps=max_steps, per_device_train_batch_size=micro, per_device_eval_batch_size=micro,
        gradient_accumulation_steps=accum, max_grad_norm=cfg.grad_clip, bf16=precision == "bf16",
        fp16=precision == "fp16", torch_compile=compile,
        eval_strategy="steps" if has_eval else "no", eval_steps=max(1, min(cfg.eval_every, max_steps)),
        save_strategy="steps", save_steps=cfg.save_every, save_total_limit=None,  # CompleteMarker rotates
        logging_steps=cfg.log_every, report_to=cfg.report_to, seed=cfg.seed, data_seed=cfg.seed,
        dataloader_num_workers=num_workers, dataloader_pin_memory=torch.cuda.is_available(),
        # from pinned memory, without a stream sync per tensor (accelerate's default copy is blocking)
        accelerator_config={"non_blocking": torch.cuda.is_available()},
        prediction_loss_only=True, use_cpu=not torch.cuda.is_available(), ddp_find_unused_parameters=False,
        logging_nan_inf_filter=False,  # True checks isnan(loss) every step: a host-device sync on GPU
        remove_unused_columns=False,  # our datasets hold only model inputs; the filter would wrap the collator
    )
    return (args_class or TrainingArguments)(**{**options, **extra})
