"""Stage 6: preference tuning with DPO (TRL's `DPOTrainer`) on chatforge's Trainer set-up.

The starting model is also the reference (TRL keeps a frozen copy in memory, or with `--lora` the same
weights with the adapters off): no second model on disk. Records in TRL's, the implicit-prompt and the
ShareGPT preference formats (`text/preferences.py`) become TRL's conversational form, which TRL renders
with the model's chat template. Checkpoints, markers, `--resume`, `--max-time`, TensorBoard and the
resolved run_config.yaml work as in `sft`; the output is a plain Hugging Face folder with the chat
template and stop token intact. Held-out pairs give rewards/chosen, rewards/rejected, margins and
accuracy in summary.json.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from chatforge.config import option
from chatforge.errors import ChatforgeError
from chatforge.modeling import quiet_optional_imports
from chatforge.train.common import FineTuneSettings, RunSettings, check_model_dir, is_main, redefault

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
              "apo_zero", "apo_down", "discopop", "sigmoid_norm")


@dataclass
class DPOConfig(FineTuneSettings):
    """Everything that defines a DPO run; saved as out/run_config.yaml. Learning rate auto: 5e-6, or 5e-5
    with LoRA (DPO moves a chat model a little)."""

    model: str = option("", "the chat model to align (a chatforge sft run or any HF causal LM folder)",
                        metavar="MODEL_DIR")
    data: list[str] = option([], "preference pairs, repeatable: prompt/chosen/rejected (strings or messages), "
                                 "or ShareGPT conversations + chosen/rejected; jsonl/json/parquet or hf:NAME",
                             metavar="SRC")
    out: str = option("run-dpo", "run folder", metavar="DIR")
    beta: float = option(0.1, "how far from the reference model the policy may move (DPO's beta)", min=0.0,
                         exclusive_min=True, max=100.0)
    loss_type: str = option("sigmoid", "sigmoid = DPO; ipo, apo_zero, ... as TRL names them", choices=LOSS_TYPES)
    max_length: int | None = option(None, "tokens per prompt + answer; longer pairs are cut (default: the context "
                                          "window)", min=2, metavar="N")
    eval_fraction: float = redefault(FineTuneSettings, "eval_fraction", 0.1)
    epochs: float = redefault(FineTuneSettings, "epochs", 1.0)
    micro_batch_size: int = redefault(FineTuneSettings, "micro_batch_size", 4)
    eval_every: int = redefault(RunSettings, "eval_every", 50)

    def validate(self) -> None:
        super().validate()
        check_model_dir(self.model, "dpo", "a chat model")
        if not self.data:
            raise ChatforgeError("dpo needs --data (preference pairs: jsonl/json/parquet or hf:NAME)")


def load_pairs(cfg: DPOConfig, log=print) -> tuple[list[dict], list[dict]]:
    """Every usable pair; (train, held out), deterministic; stop if none is usable."""
    from chatforge.text.preferences import iter_preferences
    from chatforge.text.sources import SourceStats

    stats = SourceStats()
    pairs = [pair for pair, _ in iter_preferences(cfg.data, strict=cfg.strict, stats=stats)]
    if not pairs:
        raise ChatforgeError(f"{', '.join(cfg.data)}: no usable preference pair ({stats.summary()})")
    log(f"preference pairs: {len(pairs)} usable ({stats.summary()})")
    if cfg.eval_fraction <= 0 or len(pairs) < 2:
        return pairs, []
    period = max(2, round(1 / cfg.eval_fraction))
    return ([p for i, p in enumerate(pairs) if i % period != period - 1],
            [p for i, p in enumerate(pairs) if i % period == period - 1])


def drop_unanswerable(pairs: list[dict], tok, max_length: int) -> tuple[list[dict], int, int]:
    """(the pairs whose prompt leaves room for an answer token within max_length, how many did not, how many
    spell a special token in a message): TRL would drop the first silently, and fail on an empty dataset when
    every pair is such a one; the second would train control tokens (`conversations.spells_special_token`)."""
    from chatforge.text.conversations import prompt_length, special_tokens_pattern, spells_special_token

    specials = special_tokens_pattern(tok)
    plain = [p for p in pairs if not spells_special_token(specials, p["prompt"] + p["chosen"] + p["rejected"])]
    kept = [p for p in plain if prompt_length(tok, p["prompt"]) < max_length]
    return kept, len(plain) - len(kept), len(pairs) - len(plain)


def dpo(cfg: DPOConfig, resume: bool = False, overwrite: bool = False, log=print) -> dict:
    from datasets import Dataset

    quiet_optional_imports()
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    from chatforge import config as config_io
    from chatforge.modeling import context_length, resolve_precision
    from chatforge.outputs import check_not_inputs, claim
    from chatforge.train.callbacks import Throughput
    from chatforge.train.common import (
        RUN_CONFIG,
        Plan,
        finish_run,
        run_trainer,
        world_size,
    )
    from chatforge.train.sft import _save_final, prepare_model_and_tokenizer

    cfg.validate()
    check_not_inputs(cfg.out, [("--model", cfg.model)] + [("--data", d) for d in cfg.data])
    train, evals = load_pairs(cfg, log)
    model, tok, _ = prepare_model_and_tokenizer(cfg.model, log)
    ctx = context_length(model.config)
    max_length = cfg.max_length or ctx
    if max_length > ctx:
        raise ChatforgeError(f"--max-length {max_length} is above the {ctx} positions of {cfg.model}")
    (train, *train_drops), (evals, *eval_drops) = (drop_unanswerable(part, tok, max_length) for part in (train, evals))
    too_long, special = (a + b for a, b in zip(train_drops, eval_drops))
    if too_long:
        log(f"preference pairs: {too_long} skipped, their prompt alone fills --max-length {max_length} tokens")
    if special:
        log(f"preference pairs: {special} skipped, a message spells a special token")
    if not train:
        raise ChatforgeError(f"{', '.join(cfg.data)}: no training pair left (prompts that fill --max-length "
                             f"{max_length}: {too_long}, spelling a special token: {special})")
    if is_main():  # every input checked: only now may an earlier run in --out be replaced
        claim(cfg.out, "dpo", overwrite=overwrite, resume=resume)
    precision = resolve_precision(cfg.precision)
    micro = min(cfg.micro_batch_size, len(train))
    per_step = micro * cfg.grad_accum * world_size()
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train) / per_step))
    lr = cfg.learning_rate or (5e-5 if cfg.lora else 5e-6)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, max_steps // 10)
    if is_main():
        config_io.save(DPOConfig(**{**asdict(cfg), "max_length": max_length, "learning_rate": lr,
                                    "warmup_steps": warmup, "max_steps": max_steps}), Path(cfg.out) / RUN_CONFIG)
    log(f"dpo: {len(train)} train / {len(evals)} held-out pairs, {max_steps} steps x {per_step} pairs, lr {lr:g}, "
        f"beta {cfg.beta:g}, loss {cfg.loss_type}, {precision}{', LoRA' if cfg.lora else ''}")
    peft = None
    if cfg.lora:
        from peft import LoraConfig

        peft = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                          task_type="CAUSAL_LM")
    chars = sum(len(str(p)) for p in train) / len(train)  # a rough tokens-per-step for the throughput log
    throughput = Throughput(int(chars / 3 * per_step), None)
    trainer, metrics = run_trainer(
        cfg, cfg.out, model, tok, Dataset.from_list(train), Dataset.from_list(evals) if evals else None,
        Plan(max_steps, micro, cfg.grad_accum, lr, warmup, precision), kind="dpo", throughput=throughput,
        resume=resume, log=log, trainer_class=DPOTrainer, args_class=TRLConfig,
        args_extra={"beta": cfg.beta, "loss_type": [cfg.loss_type], "max_length": max_length,
                    "prediction_loss_only": False},
        trainer_extra={"peft_config": peft})
    _save_final(trainer, trainer.model, tok, cfg, log)
    summary = {**throughput.summary(trainer.state), "train_pairs": len(train), "eval_pairs": len(evals), **metrics}
    del trainer, model
    return finish_run(cfg.out, summary, f"done: {summary['steps']} steps, held-out reward accuracy "
                      f"{summary.get('eval_rewards/accuracies')}, margin {summary.get('eval_rewards/margins')} -> "
                      f"{cfg.out}\ntalk to it: chatforge chat {cfg.out}", log)
