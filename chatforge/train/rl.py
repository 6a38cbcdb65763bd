"""Stage 7: reinforcement learning with verifiable rewards (GRPO, on TRL's `GRPOTrainer`).

For each prompt the policy samples a group of completions; each is scored by the reward functions
(`rewards.py`), and the advantages are the rewards relative to their group, so no value model is needed.
The task is a JSONL file in `chatforge eval`'s generation format (`prompt`, `answer`, optional `regex`; so a
task trains and evaluates from the same file) or the built-in procedural `arithmetic` task (seeded, with
held-out items no training prompt repeats). Held-out accuracy is greedy decoding scored by the exact-answer
reward: before training, every `--eval-every` steps, and at the end (summary.json). Checkpoints, markers,
`--resume`, `--max-time`, TensorBoard, LoRA and the resolved run_config.yaml work as in `sft`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from chatforge.config import option
from chatforge.errors import ChatforgeError
from chatforge.modeling import quiet_optional_imports
from chatforge.train.common import FineTuneSettings, RunSettings, check_model_dir, is_main, redefault

ARITHMETIC = "arithmetic"


@dataclass
class RLConfig(FineTuneSettings):
    """Everything that defines an RL run; saved as out/run_config.yaml. Learning rate auto: 1e-5, or 1e-4 with
    LoRA."""

    model: str = option("", "the chat model to train (a chatforge sft run or any HF causal LM folder)",
                        metavar="MODEL_DIR")
    task: str = option(ARITHMETIC, "prompts with reference answers: a JSONL file in chatforge eval's generation "
                                   "format, or 'arithmetic' (built in, procedural)", metavar="TASK")
    reward: list[str] = option(["exact"], "reward functions, repeatable: exact, format, math (math-verify), code "
                                          "(records with a 'test'), or PATH.py:FUNCTION of your own", metavar="R")
    operand_max: int = option(20, "arithmetic: operands 0..N (every pair once)", min=1, max=1000, metavar="N")
    num_generations: int = option(8, "completions sampled per prompt (the group)", min=2, metavar="G")
    max_completion_length: int = option(32, "tokens per completion", min=1, metavar="N")
    temperature: float = option(1.0, "sampling temperature of the completions", min=0.0, exclusive_min=True,
                                max=10.0)
    beta: float = option(0.04, "KL penalty to the starting model (0 = none, and no reference copy)", min=0.0,
                         max=100.0)
    use_vllm: bool = option(False, "generate with vLLM (GPU, vllm installed; TRL's colocate mode)")
    export: str | None = option(None, "write the task to DIR (sft.jsonl, train.jsonl, heldout.jsonl) and stop",
                                metavar="DIR")
    out: str = option("run-rl", "run folder", metavar="DIR")
    eval_fraction: float = redefault(FineTuneSettings, "eval_fraction", 0.2)
    epochs: float = redefault(FineTuneSettings, "epochs", 1.0)
    micro_batch_size: int = redefault(FineTuneSettings, "micro_batch_size", 16)  # completions: 2 prompts x 8
    eval_every: int = redefault(RunSettings, "eval_every", 50)

    def validate(self) -> None:
        from chatforge.train.rewards import reward_functions

        super().validate()
        if not self.export:
            check_model_dir(self.model, "rl", "a chat model")
        if self.task != ARITHMETIC and not Path(self.task).is_file():
            raise ChatforgeError(f"--task {self.task}: no such file (or use --task {ARITHMETIC})")
        if self.task == ARITHMETIC and "code" in self.reward:
            raise ChatforgeError("--reward code needs a task file whose records carry a 'test' (Python asserts)")
        if self.micro_batch_size % self.num_generations:  # whole groups per batch (TRL's rule, held-out too)
            raise ChatforgeError(f"--micro-batch-size ({self.micro_batch_size}) must be a multiple of "
                                 f"--num-generations ({self.num_generations}): completions per forward pass")
        twice = sorted({spec for spec in self.reward if self.reward.count(spec) > 1})
        if twice:  # TRL would sum it twice under one logged name
            raise ChatforgeError(f"--reward {twice[0]} is given twice; each reward counts once")
        reward_functions(self.reward)  # unknown names, missing packages, a user file that does not load
        if self.use_vllm and importlib.util.find_spec("vllm") is None:
            raise ChatforgeError("--use-vllm needs vLLM: pip install vllm (on a GPU machine)")


def arithmetic_items(operand_max: int, seed: int) -> list[dict]:
    """Every 'a + b' with operands 0..operand_max, in a seeded order: the same items for the same seed."""
    items = [{"prompt": f"What is {a} + {b}? Answer with the number only.", "answer": str(a + b),
              "regex": r"-?\d+"} for a in range(operand_max + 1) for b in range(operand_max + 1)]
    random.Random(seed).shuffle(items)
    return items


def task_items(cfg: RLConfig) -> tuple[list[dict], list[dict]]:
    """(train, held out): deterministic, and disjoint by prompt (a prompt repeated in a task file stays on
    one side); the held-out prompts are the first --eval-fraction of them, in file (or seeded) order."""
    from chatforge.eval.tasks import read_task_file

    if cfg.task == ARITHMETIC:
        items = arithmetic_items(cfg.operand_max, cfg.seed)
    else:
        task = read_task_file(Path(cfg.task))
        if task.kind != "generate_until":
            raise ChatforgeError(f"--task {cfg.task}: multiple-choice records; rl needs prompt/answer records")
        for line, r in enumerate(task.records, 1):
            if not isinstance(r.get("test") or "", str):
                raise ChatforgeError(f"{cfg.task}:{line}: 'test' must be a string of Python asserts")
        items = [{"prompt": r["prompt"], "answer": str(r["answer"]), "regex": r.get("regex") or "",
                  "test": r.get("test") or ""} for r in task.records]
        if "code" in cfg.reward and not all(r["test"] for r in items):
            missing = sum(not r["test"] for r in items)
            raise ChatforgeError(f"--task {cfg.task}: --reward code needs a 'test' (Python asserts) in every record; "
                                 f"{missing} of {len(items)} have none")
    prompts = list(dict.fromkeys(r["prompt"] for r in items))
    if cfg.eval_fraction <= 0 or len(prompts) < 2:
        return items, []
    held = set(prompts[:max(1, round(len(prompts) * cfg.eval_fraction))])
    return [r for r in items if r["prompt"] not in held], [r for r in items if r["prompt"] in held]


def export_task(cfg: RLConfig, train: list[dict], heldout: list[dict], log=print) -> dict:
    """The task as files: sft.jsonl (conversations answering the training prompts, for `chatforge sft`),
    train.jsonl and heldout.jsonl (chatforge eval's generation format, for `chatforge eval --task-file`)."""
    from chatforge.outputs import check_not_inputs, claim, write_atomic

    check_not_inputs(cfg.export, [("--task", cfg.task)], flag="--export")
    claim(cfg.export, "rl-task", resume=True, flag="--export")  # an earlier export: only its three files are replaced

    def write(name: str, records) -> None:
        text = "".join(json.dumps({k: v for k, v in r.items() if v}, ensure_ascii=False) + "\n" for r in records)
        write_atomic(Path(cfg.export) / name, text.encode())

    write("sft.jsonl", ({"messages": [{"role": "user", "content": r["prompt"]},
                                      {"role": "assistant", "content": r["answer"]}]} for r in train))
    write("train.jsonl", train)
    write("heldout.jsonl", heldout)
    log(f"task {cfg.task}: {len(train)} training and {len(heldout)} held-out items -> {cfg.export}/"
        "{sft,train,heldout}.jsonl")
    return {"train": len(train), "heldout": len(heldout), "out": cfg.export}


def heldout_accuracy(model, tok, items: list[dict], max_new_tokens: int, batch: int = 32) -> float:
    """Greedy answers to the held-out prompts (through the chat template), scored by the exact reward."""
    import torch

    from chatforge.train.rewards import exact_reward

    if not items:
        return float("nan")
    was_training, side = model.training, tok.padding_side
    model.eval()
    tok.padding_side = "left"
    texts = []
    try:
        for start in range(0, len(items), batch):
            chunk = items[start:start + batch]
            prompts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                               add_generation_prompt=True) for r in chunk]
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
            texts += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tok.padding_side = side
        model.train(was_training)
    scores = exact_reward(None, texts, answer=[r["answer"] for r in items], regex=[r.get("regex") for r in items])
    return sum(scores) / len(scores)


def _finite(value) -> float | None:
    """A metric for summary.json (strict JSON: no NaN or Infinity), rounded; None when there is none."""
    return round(value, 4) if isinstance(value, (int, float)) and math.isfinite(value) else None


def check_room(tok, items: list[dict], max_completion_length: int, ctx: int) -> None:
    """Every prompt (through the chat template) plus --max-completion-length within the model's positions."""
    from chatforge.text.conversations import prompt_length

    longest = max((prompt_length(tok, [{"role": "user", "content": r["prompt"]}]) for r in items), default=0)
    if longest + max_completion_length > ctx:
        raise ChatforgeError(f"--max-completion-length {max_completion_length}: the longest prompt is {longest} "
                             f"tokens, and this model's context window is {ctx}; shorten one of them")


def rl(cfg: RLConfig, resume: bool = False, overwrite: bool = False, log=print, callbacks: tuple = ()) -> dict:
    cfg.validate()
    train, heldout = task_items(cfg)
    if cfg.export:
        return export_task(cfg, train, heldout, log)
    from datasets import Dataset

    quiet_optional_imports()
    from trl import GRPOConfig, GRPOTrainer

    from chatforge import config as config_io
    from chatforge.modeling import context_length, resolve_precision
    from chatforge.outputs import check_not_inputs, claim
    from chatforge.train.callbacks import Throughput
    from chatforge.train.common import RUN_CONFIG, Plan, finish_run, run_trainer, world_size
    from chatforge.train.rewards import reward_functions
    from chatforge.train.sft import _save_final, prepare_model_and_tokenizer

    rewards = [("--reward", spec.rpartition(":")[0]) for spec in cfg.reward if ".py:" in spec]  # user files
    check_not_inputs(cfg.out, [("--model", cfg.model), ("--task", cfg.task), *rewards])
    model, tok, _ = prepare_model_and_tokenizer(cfg.model, log)
    check_room(tok, train + heldout, cfg.max_completion_length, context_length(model.config))
    funcs = reward_functions(cfg.reward)
    if is_main():  # every input checked: only now may an earlier run in --out be replaced
        claim(cfg.out, "rl", overwrite=overwrite, resume=resume)
    precision = resolve_precision(cfg.precision)
    prompts_per_step = cfg.micro_batch_size * cfg.grad_accum * world_size() // cfg.num_generations
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train) / prompts_per_step))
    lr = cfg.learning_rate or (1e-4 if cfg.lora else 1e-5)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, max_steps // 20)
    if is_main():
        config_io.save(RLConfig(**{**asdict(cfg), "learning_rate": lr, "warmup_steps": warmup,
                                   "max_steps": max_steps}), Path(cfg.out) / RUN_CONFIG)
    before = heldout_accuracy(model, tok, heldout, cfg.max_completion_length)
    log(f"rl: {len(train)} train / {len(heldout)} held-out prompts, {max_steps} steps x {prompts_per_step} prompts x "
        f"{cfg.num_generations} completions, rewards {', '.join(cfg.reward)}, lr {lr:g}, beta {cfg.beta:g}, "
        f"{precision}; held-out accuracy before: {before:.3f}")

    def record(r: dict) -> dict:
        return {"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"],
                "regex": r.get("regex") or "", "test": r.get("test") or ""}

    class RLTrainer(GRPOTrainer):
        """GRPO whose evaluation is greedy held-out accuracy (TRL's own evaluation samples)."""

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            metrics = {f"{metric_key_prefix}_accuracy": heldout_accuracy(self.model, self.processing_class, heldout,
                                                                         cfg.max_completion_length)}
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    peft = None
    if cfg.lora:
        from peft import LoraConfig

        peft = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                          task_type="CAUSAL_LM")
    throughput = Throughput(cfg.micro_batch_size * cfg.grad_accum * world_size() * cfg.max_completion_length, None)
    trainer, metrics = run_trainer(
        cfg, cfg.out, model, tok, Dataset.from_list([record(r) for r in train]),
        Dataset.from_list([record(r) for r in heldout]) if heldout else None,
        Plan(max_steps, cfg.micro_batch_size, cfg.grad_accum, lr, warmup, precision), kind="rl",
        throughput=throughput, resume=resume, log=log, callbacks=callbacks, trainer_class=RLTrainer,
        args_class=GRPOConfig,
        args_extra={"num_generations": cfg.num_generations, "max_completion_length": cfg.max_completion_length,
                    "temperature": cfg.temperature, "beta": cfg.beta, "use_vllm": cfg.use_vllm,
                    "vllm_mode": "colocate", "prediction_loss_only": False},
        trainer_extra={"reward_funcs": funcs, "peft_config": peft})
    _save_final(trainer, trainer.model, tok, cfg, log)
    history = [h for h in trainer.state.log_history if "reward" in h]
    summary = {**throughput.summary(trainer.state), "train_prompts": len(train), "heldout_prompts": len(heldout),
               "heldout_accuracy_before": _finite(before), **metrics}
    if history:  # TRL logs None for steps where every reward was None
        summary.update({k: _finite(history[-1][k]) for k in ("reward", "reward_std", "kl", "completions/mean_length")
                        if k in history[-1]})
    del trainer, model
    return finish_run(cfg.out, summary, f"done: {summary['steps']} steps, held-out accuracy {before:.3f} -> "
                      f"{summary.get('eval_accuracy', float('nan')):.3f} -> {cfg.out}\n"
                      f"talk to it: chatforge chat {cfg.out}", log)
