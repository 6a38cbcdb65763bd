"""Trainer callbacks: checkpoint markers, throughput and perplexity, the wall-clock budget."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from chatforge.train.common import COMPLETE_MARKER, STARTED_MARKER, Schedule, complete_checkpoints, is_main


class CompleteMarker(TrainerCallback):
    """Marks every checkpoint as chatforge's twice: `STARTED_MARKER` before the Trainer writes into it,
    `COMPLETE_MARKER` after it finished every file. A kill mid-save leaves a folder with only the first,
    which `--resume` removes; a folder with neither is not ours and is never touched. The complete
    marker records the training seconds so far: `--max-time` is a budget across resumes. It also keeps the
    newest `keep` complete checkpoints, deleting older ones only once the new one is marked: the Trainer's own
    rotation runs before that, so with a limit of 1 a kill in between left no checkpoint to resume from."""

    def __init__(self, extra: dict | None = None, seconds_before: float = 0.0, keep: int | None = None):
        self.extra, self.seconds_before, self.keep = extra or {}, seconds_before, keep
        self.start = time.time()

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save and is_main():  # set by the Trainer's flow callback, which runs before us
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            ckpt.mkdir(parents=True, exist_ok=True)
            (ckpt / STARTED_MARKER).write_text(json.dumps({"step": state.global_step}))

    def on_save(self, args, state, control, **kwargs):
        if is_main():
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                seconds = self.seconds_before + time.time() - self.start
                tmp = ckpt / (COMPLETE_MARKER + ".tmp")
                tmp.write_text(json.dumps({"step": state.global_step, "time": time.time(),
                                           "train_seconds": round(seconds, 3), **self.extra}))
                os.replace(tmp, ckpt / COMPLETE_MARKER)
                for old in complete_checkpoints(args.output_dir)[:-self.keep] if self.keep else []:
                    shutil.rmtree(old, ignore_errors=True)


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
            _sync()
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
        out = {"steps": min(state.global_step, state.max_steps), "train_seconds": round(elapsed, 1),
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
    `seconds` is what is left of the budget (a resumed run has used the rest). The progress bar
    (`progress`, the Trainer's ProgressCallback) follows the plan, so its ETA is the time budget's.

    The plan is remade at steps 5, 10, 20, 40, ... from the rate measured after the first steps, which
    are slow (allocation, kernel selection) and would otherwise make the run stop far too early.
    """

    def __init__(self, seconds: float, schedule: Schedule, first_plan: int = 5, progress=None):
        self.seconds, self.schedule, self.progress = seconds, schedule, progress
        self.cap, self.warmup = schedule.total_steps, schedule.warmup_steps
        self.next_plan = first_plan
        self.start = self.mark = None
        self.start_step = self.mark_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.mark = time.time()
        self.start_step = self.mark_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        done = state.global_step - self.start_step
        if done >= self.next_plan:
            _sync()  # a rate from the GPU's finished steps, not the ones still queued
        now = time.time()
        elapsed = now - self.start
        if done >= self.next_plan:
            if state.global_step > self.mark_step:
                per_step = (now - self.mark) / (state.global_step - self.mark_step)
                fit = state.global_step + int((self.seconds - elapsed) / per_step * 0.95)
                self.schedule.total_steps = max(state.global_step + 1, min(self.cap, fit))
                self.schedule.warmup_steps = min(self.warmup, max(1, self.schedule.total_steps // 20))
                bar = getattr(self.progress, "training_bar", None)
                if bar is not None:  # show the steps that fit in the time, not the epoch cap
                    bar.total = self.schedule.total_steps
                    bar.refresh()
            if self.next_plan == 5:  # measure from here on: the warm-up steps are not representative
                self.mark, self.mark_step = now, state.global_step
            self.next_plan *= 2
        if state.global_step >= self.schedule.total_steps or elapsed >= self.seconds:
            control.should_training_stop = True
            control.should_save = True
            control.should_evaluate = True


def _sync() -> None:
    """Wait for queued GPU work, so that a wall-clock reading covers the steps it claims to."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
