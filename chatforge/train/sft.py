"""Stage 5: supervised fine-tuning of a (pretrained) causal LM into a chat assistant.

Each conversation is rendered with the tokenizer's ChatML template and `apply_chat_template(...,
return_assistant_tokens_mask=True)` marks the assistant tokens (content + closing <|im_end|>, from the
template's {% generation %} block). Only those tokens carry loss: never system/user text or padding.
Learning <|im_end|> is what makes the model stop.

Why the transformers Trainer and not TRL's SFTTrainer: all masks are computed here, before training,
so that an all-masked or empty dataset stops with an error before any step, truncation is counted per
conversation, and pretrain and sft share one Trainer set-up (checkpoint markers, resume, throughput,
wall-clock budget). The masking itself is transformers' own (the {% generation %} mask).

Truncation policy: a conversation longer than `max_length` keeps its first `max_length` tokens; if no
assistant token is left in that window the conversation is dropped and counted.
Packing (`--packing`): a micro-batch is flattened into one row with position ids restarting at each
conversation (transformers' DataCollatorWithFlattening); attention never crosses conversations.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from chatforge.config import option
from chatforge.errors import ChatforgeError
from chatforge.modeling import quiet_optional_imports
from chatforge.train.common import FineTuneSettings, RunSettings, check_model_dir, is_main, redefault


@dataclass
class SFTConfig(FineTuneSettings):
    """Everything that defines a fine-tuning run; saved as out/run_config.yaml. Learning rate auto:
    2e-4 with LoRA; 5e-4 below 50M parameters, else 5e-5."""

    model: str = option("", "any local Hugging Face causal-LM folder", metavar="MODEL_DIR")
    data: list[str] = option([], "conversations, repeatable: messages / ShareGPT / Alpaca / prompt-completion "
                                 "records in jsonl/json/parquet, hf:NAME[:CONFIG], or demo[:LANG]", metavar="SRC")
    out: str = option("run-chat", "run folder", metavar="DIR")
    max_length: int | None = option(None, "tokens per conversation; longer ones keep their first N tokens "
                                          "(default: the context window)", min=2, metavar="N")
    packing: bool = option(False, "pack conversations (attention stays within each)")
    eval_every: int = redefault(RunSettings, "eval_every", 100)

    def validate(self) -> None:
        super().validate()
        check_model_dir(self.model, "sft", "a pretrained causal LM")
        if not self.data:
            raise ChatforgeError("sft needs --data (conversations: jsonl/json/parquet, hf:NAME or demo)")


def encode_conversation(tok, messages: list[dict], max_length: int, specials=None) -> tuple[dict, bool]:
    """(input_ids/attention_mask/labels, was_truncated); labels are -100 outside assistant tokens. `specials`:
    `special_tokens_pattern(tok)`, when the caller encodes many."""
    from chatforge.text.conversations import InvalidRecord, special_tokens_pattern, spells_special_token

    if spells_special_token(specials or special_tokens_pattern(tok), messages):
        raise InvalidRecord("a message spells a special token")
    enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = list(enc["input_ids"])[:max_length]
    mask = list(enc["assistant_masks"])[:max_length]
    if not any(mask):
        raise InvalidRecord(f"no assistant token within --max-length {max_length}")
    labels = [t if m else -100 for t, m in zip(ids, mask)]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, len(enc["input_ids"]) > max_length


def load_examples(cfg: SFTConfig, tok, max_length: int, log=print) -> tuple[list[dict], list[dict]]:
    """Tokenize every conversation; return (train, eval); stop if nothing is left to learn from."""
    from chatforge.text.conversations import InvalidRecord, iter_conversations, special_tokens_pattern
    from chatforge.text.sources import SourceStats

    stats = SourceStats()
    examples = []
    truncated = 0
    specials = special_tokens_pattern(tok)
    for messages, origin in iter_conversations(cfg.data, strict=cfg.strict, stats=stats):
        try:
            example, was_truncated = encode_conversation(tok, messages, max_length, specials)
        except InvalidRecord as err:
            stats.skip(str(err), origin, cfg.strict)
            continue
        truncated += was_truncated
        examples.append(example)
    summary = stats.summary() + (f", {truncated} truncated to {max_length} tokens" if truncated else "")
    if not examples:
        raise ChatforgeError(f"{', '.join(cfg.data)}: no usable conversation ({summary})")
    log(f"conversations: {len(examples)} usable ({summary})")
    if cfg.eval_fraction <= 0 or len(examples) < 2:
        return examples, []
    period = max(2, round(1 / cfg.eval_fraction))  # every period-th conversation, deterministic
    held_out = set(range(period - 1, len(examples), period)) or {len(examples) - 1}
    return ([e for i, e in enumerate(examples) if i not in held_out],
            [e for i, e in enumerate(examples) if i in held_out])


def prepare_model_and_tokenizer(model_dir: str, log=print):
    """Load any local causal LM; give its tokenizer ChatML tokens + template, resizing embeddings if needed."""
    from chatforge.modeling import load_model, padded_vocab, set_generation_defaults
    from chatforge.text.tokenizer import ensure_chat_tokens, load_tokenizer

    tok = load_tokenizer(model_dir)
    model = load_model(os.path.abspath(model_dir))  # a LoRA adapter records this path: it must work from anywhere
    added = ensure_chat_tokens(tok)
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(padded_vocab(len(tok)), mean_resizing=True)
    if added:
        log(f"{model_dir}: added {added} chat token(s) to the tokenizer and resized the embeddings")
    set_generation_defaults(model, tok)
    return model, tok, added


def sft(cfg: SFTConfig, resume: bool = False, overwrite: bool = False, log=print) -> dict:
    quiet_optional_imports()
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    from chatforge import config as config_io
    from chatforge.modeling import context_length, count_parameters, resolve_precision
    from chatforge.outputs import check_not_inputs, claim
    from chatforge.train.callbacks import Throughput
    from chatforge.train.common import RUN_CONFIG, Plan, finish_run, run_trainer, world_size

    cfg.validate()
    check_not_inputs(cfg.out, [("--model", cfg.model)] + [("--data", d) for d in cfg.data])
    model, tok, added = prepare_model_and_tokenizer(cfg.model, log)
    ctx = context_length(model.config)
    max_length = cfg.max_length or ctx
    if max_length > ctx:
        raise ChatforgeError(f"--max-length {max_length} is above the {ctx} positions of {cfg.model}")
    train, evals = load_examples(cfg, tok, max_length, log)
    if is_main():  # every input checked: only now may an earlier run in --out be replaced
        claim(cfg.out, "sft", overwrite=overwrite, resume=resume)
    n_params = count_parameters(model)

    if cfg.lora:
        model = _wrap_lora(model, cfg, added)
    precision = resolve_precision(cfg.precision)
    micro = min(cfg.micro_batch_size, len(train))
    per_step = micro * cfg.grad_accum * world_size()
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train) / per_step))
    lr = cfg.learning_rate or (2e-4 if cfg.lora else 5e-4 if n_params < 50e6 else 5e-5)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, max_steps // 30)
    if is_main():
        config_io.save(SFTConfig(**{**asdict(cfg), "max_length": max_length, "learning_rate": lr,
                                    "warmup_steps": warmup, "max_steps": max_steps}), Path(cfg.out) / RUN_CONFIG)
    mean_tokens = sum(len(e["input_ids"]) for e in train) / len(train)
    log(f"sft: {len(train)} train / {len(evals)} eval conversations, {max_steps} steps x {per_step} conversations, "
        f"lr {lr:g}, {precision}{', LoRA' if cfg.lora else ''}{', packed' if cfg.packing else ''}")

    collator = DataCollatorWithFlattening() if cfg.packing else \
        DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100,
                               pad_to_multiple_of=math.gcd(64, ctx))  # never padded past the model's positions
    throughput = Throughput(int(mean_tokens * per_step), None)
    trainer, metrics = run_trainer(cfg, cfg.out, model, tok, train, evals, Plan(max_steps, micro, cfg.grad_accum, lr,
                                   warmup, precision), kind="sft", throughput=throughput, collator=collator,
                                   resume=resume, log=log)
    _save_final(trainer, model, tok, cfg, log)
    summary = {**throughput.summary(trainer.state), "train_conversations": len(train), **metrics}
    del trainer, model  # before the process group goes: see finish_distributed
    return finish_run(cfg.out, summary, f"done: {summary['steps']} steps, eval loss {summary.get('eval_loss')} -> "
                      f"{cfg.out}\ntalk to it: chatforge chat {cfg.out}", log)


def _wrap_lora(model, cfg: SFTConfig, tokens_added: int):
    from peft import LoraConfig, get_peft_model

    embeddings = [n for n, m in model.named_modules() if m is model.get_input_embeddings()]
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM",
                      # new chat tokens start untrained: their embedding rows must learn too
                      modules_to_save=[embeddings[0].split(".")[-1]] if tokens_added else None)
    model = get_peft_model(model, lora)
    return model


def _save_final(trainer, model, tok, cfg: SFTConfig, log) -> None:
    """A plain Hugging Face directory; with LoRA the adapter, or merged full weights with --merge."""
    if cfg.lora and cfg.merge:
        merged = model.merge_and_unload()
        if is_main():
            merged.save_pretrained(cfg.out)
            tok.save_pretrained(cfg.out)
            _remove_adapter_files(cfg.out)
        return
    trainer.save_model(cfg.out)
    if cfg.lora and is_main():
        log(f"saved the LoRA adapter (base: {cfg.model}); pass --merge for full weights")


def _remove_adapter_files(out: str) -> None:
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        path = os.path.join(out, name)
        if os.path.exists(path):
            os.remove(path)
