"""What `pretrain` and `sft` share around the transformers `Trainer`.

The Trainer does the loop, accumulation, clipping, mixed precision, DDP, checkpointing and resume.
chatforge adds what it lacks: precision picked from the hardware, an optimizer that decays only
matrices, a schedule whose length can follow a wall-clock budget, checkpoints that are marked complete
only once fully written, a progress bar with tokens/s, and a guard against mixing two runs in one folder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback

from chatforge.errors import ChatforgeError

COMPLETE_MARKER = "chatforge_complete.json"
RUN_CONFIG = "run_config.yaml"
SUMMARY = "summary.json"


@dataclass
class RunSettings:
    """What every training stage shares: budget, optimisation, precision and bookkeeping.
    `PretrainConfig` and `SFTConfig` extend it (and may change its defaults)."""

    max_steps: int | None = None
    max_time: float | None = None       # seconds; the LR schedule is fitted to it
    learning_rate: float | None = None  # auto per stage
    warmup_steps: int | None = None     # auto per stage
    schedule: str = "cosine"
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    precision: str = "auto"
    eval_every: int = 200
    save_every: int = 500
    save_total_limit: int = 2
    log_every: int = 10
    seed: int = 1337
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])


# ---------------------------------------------------------------- hardware


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------- run directory


def check_output_dir(out: str, resume: bool, overwrite: bool, keep: tuple[str, ...] = ()) -> None:
    """Refuse to mix runs: an output folder that already holds a run needs --resume or --overwrite."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ChatforgeError(f"{out}: exists and is not a directory")
    if not path.exists() or resume:
        return
    holds_run = (path / RUN_CONFIG).exists() or any(path.glob("checkpoint-*")) or (path / "config.json").exists()
    if not holds_run:
        return
    if not overwrite:
        raise ChatforgeError(f"{out}: already holds a run; pass --resume to continue it or --overwrite to replace it")
    for child in path.iterdir():
        if child.name in keep:
            continue
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def complete_checkpoints(out: str) -> list[Path]:
    """Checkpoints whose save finished (marker written last), oldest first."""
    found = []
    for ckpt in Path(out).glob("checkpoint-*"):
        if (ckpt / COMPLETE_MARKER).exists() and ckpt.name.split("-")[-1].isdigit():
            found.append(ckpt)
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def resume_checkpoint(out: str, log=print) -> str | None:
    """The newest complete checkpoint; incomplete ones (a save killed midway) are removed first."""
    for ckpt in Path(out).glob("checkpoint-*"):
        if not (ckpt / COMPLETE_MARKER).exists() and is_main_process():
            log(f"removing incomplete checkpoint {ckpt}")
            shutil.rmtree(ckpt, ignore_errors=True)
    done = complete_checkpoints(out)
    if not done:
        log(f"{out}: no complete checkpoint to resume from; starting from scratch")
        return None
    log(f"resuming from {done[-1]}")
    return str(done[-1])


# ---------------------------------------------------------------- optimizer and schedule


def make_optimizer(model, lr: float, weight_decay: float, betas=(0.9, 0.95)):
    """AdamW with weight decay on matrices only (not biases, norms); fused kernel where available."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError):  # fused AdamW unsupported for this device/dtype
        return torch.optim.AdamW(groups, lr=lr, betas=betas)


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


# ---------------------------------------------------------------- callbacks


class CompleteMarker(TrainerCallback):
    """Writes the marker after the Trainer finished every file of a checkpoint: a kill mid-save leaves a
    folder without it, which `--resume` ignores and removes."""

    def __init__(self, extra: dict | None = None):
        self.extra = extra or {}

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                tmp = ckpt / (COMPLETE_MARKER + ".tmp")
                tmp.write_text(json.dumps({"step": state.global_step, "time": time.time(), **self.extra}))
                os.replace(tmp, ckpt / COMPLETE_MARKER)


class Throughput(TrainerCallback):
    """Tokens/s, eval perplexity and bits per byte, written into the logs (progress bar, TensorBoard)
    and into summary.json at the end."""

    def __init__(self, tokens_per_step: int, tokens_per_byte: float | None, flops_per_token: float | None = None,
                 peak_flops: float | None = None):
        self.tokens_per_step = tokens_per_step
        self.tokens_per_byte = tokens_per_byte
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.start_step = 0
        self.window_start = None
        self.window_step = 0
        self.train_start = None
        self.rates: list[float] = []
        self.last: dict = {}
        self.first_step_s = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.train_start = self.window_start = time.time()
        self.start_step = self.window_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.first_step_s is None:  # time to first step: data loader start, compile, warm-up
            self.first_step_s = time.time() - self.train_start

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        if "loss" in logs and self.window_start is not None:
            now = time.time()
            steps = state.global_step - self.window_step
            if steps > 0:
                rate = steps * self.tokens_per_step / (now - self.window_start)
                logs["tokens_per_s"] = round(rate, 1)
                if self.flops_per_token and self.peak_flops:
                    logs["mfu"] = round(rate * self.flops_per_token / self.peak_flops, 4)
                if self.window_step > self.start_step:  # skip the first window (compile, warm-up)
                    self.rates.append(rate)
            self.window_start, self.window_step = now, state.global_step
        if "eval_loss" in logs:
            loss = logs["eval_loss"]
            logs["eval_ppl"] = round(math.exp(min(loss, 50)), 3)
            if self.tokens_per_byte:
                logs["eval_bpb"] = round(loss * self.tokens_per_byte / math.log(2), 4)
        self.last.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})

    def summary(self, state) -> dict:
        elapsed = time.time() - (self.train_start or time.time())
        steps = state.global_step - self.start_step
        mean_rate = (sum(self.rates) / len(self.rates)) if self.rates else steps * self.tokens_per_step / max(elapsed, 1e-9)
        out = {"steps": state.global_step, "train_seconds": round(elapsed, 1),
               "tokens_per_s": round(mean_rate, 1), "tokens_seen": state.global_step * self.tokens_per_step}
        if self.flops_per_token and self.peak_flops:
            out["mfu"] = round(mean_rate * self.flops_per_token / self.peak_flops, 4)
        if self.first_step_s is not None:
            out["first_step_s"] = round(self.first_step_s, 2)
        if torch.cuda.is_available():
            out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        else:  # peak resident memory of the process (Linux reports KiB)
            import resource

            out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        for key in ("eval_loss", "eval_ppl", "eval_bpb", "loss"):
            if key in self.last:
                out[key] = self.last[key]
        return out


class WallClockBudget(TrainerCallback):
    """`--max-time`: fit the LR schedule (length and warm-up) to the steps that fit in the time, then stop.

    The plan is remade at steps 5, 10, 20, 40, ... from the rate measured after the first steps, which
    are slow (allocation, kernel selection) and would otherwise make the run stop far too early.
    """

    def __init__(self, seconds: float, schedule: Schedule, first_plan: int = 5):
        self.seconds, self.schedule = seconds, schedule
        self.cap, self.warmup = schedule.total_steps, schedule.warmup_steps
        self.next_plan = first_plan
        self.start = self.mark = None
        self.start_step = self.mark_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.mark = time.time()
        self.start_step = self.mark_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        now = time.time()
        elapsed = now - self.start
        done = state.global_step - self.start_step
        if done >= self.next_plan:
            if state.global_step > self.mark_step:
                per_step = (now - self.mark) / (state.global_step - self.mark_step)
                fit = state.global_step + int((self.seconds - elapsed) / per_step * 0.95)
                self.schedule.total_steps = max(state.global_step + 1, min(self.cap, fit))
                self.schedule.warmup_steps = min(self.warmup, max(1, self.schedule.total_steps // 20))
            if self.next_plan == 5:  # measure from here on: the warm-up steps are not representative
                self.mark, self.mark_step = now, state.global_step
            self.next_plan *= 2
        if state.global_step >= self.schedule.total_steps or elapsed >= self.seconds:
            control.should_training_stop = True
            control.should_save = True
            control.should_evaluate = True


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


def write_summary(out: str, summary: dict) -> None:
    Path(out, SUMMARY).write_text(json.dumps(summary, indent=2))


def training_arguments(cfg: RunSettings, out: str, *, max_steps: int, micro: int, accum: int, precision: str,
                       has_eval: bool, compile: bool = False, num_workers: int = 0):
    """The TrainingArguments both stages use; TensorBoard logs go to out/logs."""
    from transformers import TrainingArguments

    os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(out) / "logs")
    return TrainingArguments(
        output_dir=out, max_steps=max_steps, per_device_train_batch_size=micro, per_device_eval_batch_size=micro,
        gradient_accumulation_steps=accum, max_grad_norm=cfg.grad_clip, bf16=precision == "bf16",
        fp16=precision == "fp16", torch_compile=compile,
        eval_strategy="steps" if has_eval else "no", eval_steps=max(1, min(cfg.eval_every, max_steps)),
        save_strategy="steps", save_steps=cfg.save_every, save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.log_every, report_to=cfg.report_to, seed=cfg.seed, data_seed=cfg.seed,
        dataloader_num_workers=num_workers, dataloader_pin_memory=torch.cuda.is_available(),
        # from pinned memory, without a stream sync per tensor (accelerate's default copy is blocking)
        accelerator_config={"non_blocking": torch.cuda.is_available()},
        prediction_loss_only=True, use_cpu=not torch.cuda.is_available(), ddp_find_unused_parameters=False,
        logging_nan_inf_filter=False,  # True checks isnan(loss) every step: a host-device sync on GPU
        remove_unused_columns=False,  # our datasets hold only model inputs; the filter would wrap the collator
    )


def add_callbacks(trainer, callbacks: list) -> None:
    """Put ours first, so TensorBoard and the progress bar see the metrics they add to the logs."""
    for cb in reversed(callbacks):
        trainer.callback_handler.callbacks.insert(0, cb)
