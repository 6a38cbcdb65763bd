"""The `chatforge` command: one verb per pipeline stage, its flags generated from the stage's config.

Each flag comes from a config dataclass field (`config.option`): its name, type, help and default are
declared there once. Flags default to "not given", so that only what the user typed overrides
`--config FILE.yaml`, which overrides the dataclass defaults. Bad input of any kind ends in one line,
`chatforge: error: ...`, and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing

from chatforge import config
from chatforge.errors import ChatforgeError
from chatforge.malloc import keep_freed_memory
from chatforge.modeling import quiet_optional_imports

RUN_FLAGS = ("config", "resume", "overwrite")  # how to run a stage, not what it is: never saved


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the command's --help has the rest), and no abbreviated
    flags: a typo must not silently become another option."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"chatforge: error: {message} (see `{self.prog} --help`)\n")


def add_options(parser: argparse.ArgumentParser, cls, defaults=None) -> None:
    """One flag per field of `cls` (nested option groups included), from the field's declaration. `defaults`:
    the group's instance in its parent config, whose values are the defaults shown (chat's temperature 0.7)."""
    hints = config.type_hints(cls)
    groups = config.nested_groups(cls)
    for f in dataclasses.fields(cls):
        if f.name in groups:
            add_options(parser, groups[f.name], defaults=f.default_factory())
            continue
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        kind, _, is_list = config.field_kind(hints[f.name])
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        default = getattr(defaults, f.name) if defaults is not None else default
        help_text = (meta.get("help") or "").replace("%", "%%")
        if default not in (None, "", [], False) and "default:" not in help_text:
            shown = ", ".join(map(str, default)) if isinstance(default, list) else default
            help_text += f" (default: {shown})"
        if meta.get("positional"):  # a list field takes one or more values
            parser.add_argument(f.name, metavar=meta.get("metavar"), help=help_text, nargs="+" if is_list else None)
            continue
        kw: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if kind is bool:
            # --x / --no-x where the default is on or unset (decided at run time); --x alone where it is off
            kw["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
        else:
            kw["type"] = kind
            kw["metavar"] = meta.get("metavar") or (None if meta.get("choices") else kind.__name__.upper())
            if meta.get("choices") and not is_list:
                kw["choices"] = meta["choices"]
            if is_list:
                kw["action"] = "append"
        parser.add_argument(config.flag_name(f), **kw)


def build_config(cls, args: argparse.Namespace):
    values = {k: v for k, v in vars(args).items() if k not in ("command", "sub", "func", *RUN_FLAGS)}
    yaml_path = getattr(args, "config", None)
    if yaml_path is None and getattr(args, "resume", False) and values.get("out"):
        from chatforge.outputs import owner_kind
        from chatforge.train.common import RUN_CONFIG

        saved = os.path.join(values["out"], RUN_CONFIG)
        # --resume continues with the run's own options (a folder of another kind is refused later)
        if os.path.exists(saved) and owner_kind(values["out"]) == args.command:
            yaml_path = saved
            check_schedule_kept(config.load_yaml(saved), values)
    return config.build(cls, yaml_path, **values)


# The checkpoint holds the learning-rate schedule these options shaped: a resumed run given others would go on
# at a rate fitted to the old ones (past its old end: 0, training nothing). Batch options are left free: a run
# resolves them (a micro-batch cut to a small corpus), so the original command typed again would differ.
SCHEDULE_OPTIONS = ("max_steps", "epochs", "max_tokens", "max_epochs", "tokens_per_param", "learning_rate",
                    "warmup_steps", "min_lr_ratio", "schedule")


def check_schedule_kept(saved: dict, typed: dict) -> None:
    for name in SCHEDULE_OPTIONS:
        if name in typed and name in saved and typed[name] != saved[name]:
            flag = "--" + name.replace("_", "-")
            raise ChatforgeError(f"{flag} {typed[name]}: the run being resumed has {saved[name]}, and its "
                                 f"checkpoint's schedule follows that; to train further, start a new run from it "
                                 f"(pretrain --init-from, or --model for the other stages)")


# ---------------------------------------------------------------- commands


def cmd_quickstart(cfg, args) -> None:
    from chatforge.quickstart import quickstart

    quickstart(cfg, overwrite=args.overwrite)


def cmd_tokenizer_train(cfg, args) -> None:
    from chatforge.text.tokenizer import train_tokenizer

    train_tokenizer(cfg)


def cmd_data_prepare(cfg, args) -> None:
    from chatforge.data import prepare

    prepare(cfg)


def cmd_data_merge(cfg, args) -> None:
    from chatforge.data import merge

    merge(cfg)


def cmd_pretrain(cfg, args) -> None:
    from chatforge.train.pretrain import pretrain

    pretrain(cfg, resume=args.resume, overwrite=args.overwrite)


def cmd_sft(cfg, args) -> None:
    from chatforge.train.sft import sft

    sft(cfg, resume=args.resume, overwrite=args.overwrite)


def cmd_dpo(cfg, args) -> None:
    from chatforge.train.dpo import dpo

    dpo(cfg, resume=args.resume, overwrite=args.overwrite)


def cmd_rl(cfg, args) -> None:
    from chatforge.train.rl import rl

    rl(cfg, resume=args.resume, overwrite=args.overwrite)


def cmd_generate(cfg, args) -> None:
    from chatforge.chat import generate

    generate(cfg)


def cmd_chat(cfg, args) -> None:
    from chatforge.chat import chat

    chat(cfg)


def cmd_serve(cfg, args) -> None:
    from chatforge.serve.http import serve

    serve(cfg)


def cmd_eval(cfg, args) -> None:
    from chatforge.eval.run import evaluate

    evaluate(cfg)


def cmd_report(cfg, args) -> None:
    from chatforge.report import write_report

    write_report(cfg)


def _configs() -> dict:
    """Command -> (config class, function, help, description, run flags)."""
    from chatforge.chat import ChatConfig, GenerateConfig
    from chatforge.data import DataConfig, MergeConfig
    from chatforge.eval.run import EvalConfig
    from chatforge.report import ReportConfig
    from chatforge.quickstart import QuickstartConfig
    from chatforge.serve.http import ServeConfig
    from chatforge.text.tokenizer import TokenizerConfig
    from chatforge.train.dpo import DPOConfig
    from chatforge.train.pretrain import PretrainConfig
    from chatforge.train.rl import RLConfig
    from chatforge.train.sft import SFTConfig

    train_flags = ("config", "resume", "overwrite")
    return {
        "quickstart": (QuickstartConfig, cmd_quickstart, "the whole pipeline on the built-in demo data (minutes on "
                       "a CPU)", "Train a tokenizer, pretrain a tiny GPT, fine-tune it for chat and show a sample "
                       "conversation, all on the built-in demo corpus.", ("overwrite",)),
        "tokenizer train": (TokenizerConfig, cmd_tokenizer_train, "train a tokenizer on your corpus",
                            "Train a byte-level BPE tokenizer (no unknown tokens for any UTF-8 text) with "
                            "<|endoftext|>, <|im_start|>, <|im_end|>, <|pad|> reserved.", ("config",)),
        "data prepare": (DataConfig, cmd_data_prepare, "tokenize and pack a corpus into memory-mapped shards",
                         "Tokenize on all cores and write packed uint16/uint32 shards with a manifest; re-running "
                         "on the same inputs reuses them.", ("config",)),
        "data merge": (MergeConfig, cmd_data_merge, "combine shard folders (e.g. parts prepared on several machines)",
                       "Write one manifest over several shard folders of the same tokenizer, listing their files "
                       "(no token is copied); `pretrain --data OUT` reads them all.", ()),
        "pretrain": (PretrainConfig, cmd_pretrain, "pretrain a GPT from scratch (or continue one)",
                     "Pretrain a GPT-2 or Llama-style model with the transformers Trainer and write a standard "
                     "Hugging Face checkpoint.", train_flags),
        "generate": (GenerateConfig, cmd_generate, "sample text from a (base) model",
                     "Continue a prompt with a model, streaming tokens as they come.", ()),
        "sft": (SFTConfig, cmd_sft, "fine-tune a model into a chat assistant",
                "Supervised fine-tuning on conversations, loss on assistant turns only (their closing <|im_end|> "
                "included, so the model learns to stop).", train_flags),
        "dpo": (DPOConfig, cmd_dpo, "align a chat model with preference pairs (DPO, on TRL)",
                "Direct preference optimisation with TRL's DPOTrainer: the starting model is the reference; "
                "pairs in TRL's or ShareGPT's preference format.", train_flags),
        "rl": (RLConfig, cmd_rl, "reinforcement learning with verifiable rewards (GRPO, on TRL)",
               "Group relative policy optimisation with TRL's GRPOTrainer: sampled answers to a task's prompts, "
               "scored by rewards you can check (exact answer, format, math, code, your own function).", train_flags),
        "chat": (ChatConfig, cmd_chat, "chat with a model in the terminal",
                 "Multi-turn chat; tokens stream as they are generated. Type /reset to start over, /exit to quit.",
                 ()),
        "serve": (ServeConfig, cmd_serve, "serve a model: OpenAI-compatible API and a web chat page",
                  "Serve MODEL_DIR over HTTP: /v1/chat/completions, /v1/completions, /v1/models (OpenAI-"
                  "compatible, streaming), /health, and a web chat at /.", ()),
        "eval": (EvalConfig, cmd_eval, "benchmark scores: lm-eval tasks, your own task files, suites",
                 "Evaluate one or more models (a column each) on lm-evaluation-harness tasks, local JSONL tasks and "
                 "suites (builtin, core, chat), with chatforge's engine underneath.", ()),
        "report": (ReportConfig, cmd_report, "a run report with plots, and a Hugging Face model card",
                   "Write report.md with loss, learning-rate and speed plots, tables and sample answers for one or "
                   "more runs, and a model card (README.md) with the eval results.", ()),
    }


RUN_FLAG_HELP = {
    "config": ("--config", {"metavar": "YAML", "help": "options from a YAML file (flags given here win)"}),
    "resume": ("--resume", {"action": "store_true", "help": "continue the run in --out from its newest checkpoint"}),
    "overwrite": ("--overwrite", {"action": "store_true", "help": "replace a run chatforge wrote in --out"}),
}
GROUPS = {"tokenizer": "train a byte-level BPE tokenizer with chat tokens reserved",
          "data": "tokenize a corpus into packed shards; merge shard folders"}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="chatforge", description="Train your own ChatGPT-style assistant from scratch.",
                    epilog="Run `chatforge COMMAND --help` for the options of each command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    nested: dict = {}
    for name, (cls, func, help_text, description, run_flags) in _configs().items():
        if " " in name:
            group, action = name.split()
            if group not in nested:
                nested[group] = sub.add_parser(group, help=GROUPS[group]).add_subparsers(
                    dest="sub", metavar="ACTION", required=True, parser_class=Parser)
            p = nested[group].add_parser(action, help=help_text, description=description)
        else:
            p = sub.add_parser(name, help=help_text, description=description)
        add_options(p, cls)
        for flag in run_flags:
            p.add_argument(RUN_FLAG_HELP[flag][0], **RUN_FLAG_HELP[flag][1])
        p.set_defaults(func=func, config_class=cls)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    quiet_optional_imports()
    for flag in ("resume", "overwrite"):
        setattr(args, flag, getattr(args, flag, False))
    try:
        if args.resume and args.overwrite:
            raise ChatforgeError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
        cls = args.config_class
        del args.config_class
        args.func(build_config(cls, args), args)
    except BrokenPipeError:  # `chatforge generate ... | head`: the reader has what it wanted; exit as on SIGPIPE
        if args.command not in ("generate", "chat"):
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error flushing stdout at exit
        sys.exit(141)
    except (ChatforgeError, OSError, UnicodeError) as err:  # OSError: a folder that cannot be written, ...
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())  # one line, always
        print(f"chatforge: error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
