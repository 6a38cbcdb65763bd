"""The `chatforge` command: one verb per pipeline stage, each a thin layer over its module.

Options that map to a stage's config dataclass use `default=argparse.SUPPRESS`, so that only flags the
user typed override `--config FILE.yaml`, which overrides the dataclass defaults.
"""

from __future__ import annotations

import argparse
import os
import sys

from chatforge.errors import ChatforgeError
from chatforge.modeling import PRECISIONS

S = argparse.SUPPRESS
RUN_FLAGS = ("command", "sub", "config", "resume", "overwrite", "func")


def _opt(parser, *flags, **kw):
    kw.setdefault("default", S)
    parser.add_argument(*flags, **kw)


def _overrides(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in RUN_FLAGS}


def _data_options(parser) -> None:
    _opt(parser, "--data", action="append", metavar="SRC",
         help="text source, repeatable: file, folder, glob, .gz/.zst, hf:NAME[:CONFIG], demo[:LANG]")
    _opt(parser, "--text-field", metavar="NAME", help="JSON/Parquet/CSV field holding the text (default: text)")
    _opt(parser, "--doc-per-line", action="store_true", help=".txt files hold one document per line")
    _opt(parser, "--strict", action="store_true", help="fail on the first invalid UTF-8 line or skipped record")


def _run_options(parser) -> None:
    parser.add_argument("--config", metavar="YAML", help="options from a YAML file (flags given here win)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in --out")


def _sampling_options(parser, temperature: float) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)


def _engine_options(parser) -> None:
    parser.add_argument("--dtype", default="auto", choices=PRECISIONS,
                        help="weights' dtype; auto: bf16 on GPUs and on CPUs with native bf16, else fp32")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="GPU: decode step by step instead of replaying CUDA graphs (as in vLLM)")


def _engine_kwargs(args) -> dict:
    return {"dtype": args.dtype, "static": False if args.enforce_eager else None}


def _engine(args):
    from chatforge.engine import Engine

    return Engine(args.model, **_engine_kwargs(args))


def _sampling(args):
    from chatforge.engine import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)


# ---------------------------------------------------------------- commands


def cmd_tokenizer_train(args) -> None:
    from chatforge import config
    from chatforge.tokenizer import TokenizerConfig, train_tokenizer

    cfg = config.build(TokenizerConfig, args.config, **_overrides(args))
    if not cfg.out:
        raise ChatforgeError("tokenizer train needs --out DIR")
    train_tokenizer(cfg)


def cmd_data_prepare(args) -> None:
    from chatforge import config
    from chatforge.data import DataConfig, prepare

    cfg = config.build(DataConfig, args.config, **_overrides(args))
    if not cfg.out or not cfg.tokenizer:
        raise ChatforgeError("data prepare needs --tokenizer DIR and --out DIR")
    prepare(cfg)


def cmd_pretrain(args) -> None:
    from chatforge import config
    from chatforge.pretrain import PretrainConfig, pretrain
    from chatforge.training import RUN_CONFIG

    saved = os.path.join(args.out, RUN_CONFIG) if getattr(args, "out", None) else None
    base = args.config or (saved if args.resume and saved and os.path.exists(saved) else None)
    cfg = config.build(PretrainConfig, base, **_overrides(args))
    pretrain(cfg, resume=args.resume, overwrite=args.overwrite)


def cmd_generate(args) -> None:
    engine = _engine(args)
    params = _sampling(args)
    print(args.prompt, end="", flush=True)
    for piece in engine.stream(engine.encode(args.prompt), params):
        print(piece, end="", flush=True)
    print()


def cmd_sft(args) -> None:
    from chatforge import config
    from chatforge.sft import SFTConfig, sft
    from chatforge.training import RUN_CONFIG

    saved = os.path.join(args.out, RUN_CONFIG) if getattr(args, "out", None) else None
    base = args.config or (saved if args.resume and saved and os.path.exists(saved) else None)
    sft(config.build(SFTConfig, base, **_overrides(args)), resume=args.resume, overwrite=args.overwrite)


def cmd_chat(args) -> None:
    from chatforge.chat import chat_loop, reply

    engine = _engine(args)
    params = _sampling(args)
    if args.prompt is None:
        chat_loop(engine, params, system=args.system)
        return
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    reply(engine, messages + [{"role": "user", "content": args.prompt}], params)


def cmd_quickstart(args) -> None:
    from chatforge.quickstart import QuickstartConfig, quickstart

    quickstart(QuickstartConfig(out=args.out, lang=args.lang, pretrain_seconds=args.pretrain_seconds,
                                sft_seconds=args.sft_seconds))


def cmd_serve(args) -> None:
    from chatforge.serve import serve

    if args.max_batch < 1 or args.max_queue < 0:
        raise ChatforgeError("--max-batch must be >= 1 and --max-queue >= 0")
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("CHATFORGE_API_KEY"),
          max_batch=args.max_batch, max_queue=args.max_queue, model_name=args.model_name, **_engine_kwargs(args))


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatforge", description="Train your own ChatGPT-style assistant from scratch.",
        epilog="Run `chatforge COMMAND --help` for the options of each command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    quick = sub.add_parser("quickstart", help="the whole pipeline on the built-in demo data (~10 min on a CPU)",
                           description="Train a tokenizer, pretrain a tiny GPT, fine-tune it for chat and show a "
                                       "sample conversation, all on the built-in demo corpus.")
    quick.add_argument("--out", default="quickstart", metavar="DIR", help="default: quickstart")
    quick.add_argument("--lang", default="en", help="demo corpus language: en, zh, de, fr, ... (default: en)")
    quick.add_argument("--pretrain-seconds", type=float, metavar="S", help="pretraining budget (default: 240 on CPU)")
    quick.add_argument("--sft-seconds", type=float, metavar="S", help="fine-tuning budget (default: 180)")
    quick.set_defaults(func=cmd_quickstart)

    tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer with chat tokens reserved")
    tok_sub = tok.add_subparsers(dest="sub", metavar="ACTION", required=True)
    train = tok_sub.add_parser("train", help="train a tokenizer on your corpus",
                               description="Train a byte-level BPE tokenizer (no unknown tokens for any UTF-8 "
                                           "text) with <|endoftext|>, <|im_start|>, <|im_end|>, <|pad|> reserved.")
    _data_options(train)
    _opt(train, "--out", required=True, metavar="DIR", help="where to save the tokenizer directory")
    _opt(train, "--vocab-size", type=int, metavar="N", help="vocabulary size (default: 8192)")
    _opt(train, "--max-chars", type=int, metavar="N", help="train on at most N characters (default: 200M)")
    train.add_argument("--config", metavar="YAML")
    train.set_defaults(func=cmd_tokenizer_train)

    data = sub.add_parser("data", help="tokenize a corpus into packed shards")
    data_sub = data.add_subparsers(dest="sub", metavar="ACTION", required=True)
    prep = data_sub.add_parser("prepare", help="tokenize and pack a corpus into memory-mapped shards",
                               description="Tokenize on all cores and write packed uint16/uint32 shards with a "
                                           "manifest; re-running on the same inputs reuses them.")
    _data_options(prep)
    _opt(prep, "--tokenizer", required=True, metavar="DIR", help="any Hugging Face tokenizer directory")
    _opt(prep, "--out", required=True, metavar="DIR")
    _opt(prep, "--val-fraction", type=float, metavar="F", help="documents held out for validation (default: 0.005)")
    _opt(prep, "--fast-tokenizer", action=argparse.BooleanOptionalAction,
         help="tiktoken's BPE over the same vocabulary when it applies: same ids, faster (default: on)")
    prep.add_argument("--config", metavar="YAML")
    prep.set_defaults(func=cmd_data_prepare)

    pre = sub.add_parser("pretrain", help="pretrain a GPT from scratch (or continue one)",
                         description="Pretrain a GPT-2 or Llama-style model with the transformers Trainer and "
                                     "write a standard Hugging Face checkpoint.")
    _data_options(pre)
    _opt(pre, "--out", metavar="DIR", help="run directory (default: run)")
    _opt(pre, "--tokenizer", metavar="DIR", help="tokenizer directory; trained on --data when not given")
    _opt(pre, "--vocab-size", type=int, metavar="N", help="vocabulary of the tokenizer trained when none is given")
    _opt(pre, "--model-vocab-size", type=int, metavar="N",
         help="the model's vocabulary if larger than the tokenizer's (rounded up to 64): room for added tokens")
    _opt(pre, "--arch", choices=["gpt2", "llama"], help="model architecture (default: gpt2)")
    _opt(pre, "--preset", metavar="NAME", help="size: tiny, mini, small, gpt2-small, gpt2-medium, gpt2-large "
                                                "(default: tiny on CPU, gpt2-small on GPU)")
    for flag in ("--n-layer", "--d-model", "--n-head", "--n-kv-head", "--context-length"):
        _opt(pre, flag, type=int, metavar="N", help="override the preset")
    _opt(pre, "--dropout", type=float, metavar="P")
    _opt(pre, "--init-from", metavar="DIR", help="continue pretraining a local Hugging Face checkpoint")
    _opt(pre, "--max-steps", type=int, metavar="N", help="stop after N optimizer steps")
    _opt(pre, "--max-tokens", type=int, metavar="N", help="stop after N training tokens")
    _opt(pre, "--max-time", type=float, metavar="SECONDS", help="stop (and fit the LR schedule) to a time budget")
    _opt(pre, "--batch-tokens", type=int, metavar="N", help="tokens per optimizer step (gradient accumulation)")
    _opt(pre, "--micro-batch-size", type=int, metavar="N")
    _opt(pre, "--learning-rate", type=float, metavar="LR")
    _opt(pre, "--warmup-steps", type=int, metavar="N")
    _opt(pre, "--schedule", choices=["cosine", "wsd", "constant"])
    _opt(pre, "--weight-decay", type=float, metavar="W")
    _opt(pre, "--precision", choices=PRECISIONS, help="default: bf16 where supported")
    _opt(pre, "--compile", action="store_true", help="torch.compile the model")
    _opt(pre, "--gradient-checkpointing", action="store_true")
    # speed switches, all on by default; none changes the saved checkpoint (chatforge/fastloss.py)
    _opt(pre, "--fused-loss", action=argparse.BooleanOptionalAction, help="chunked LM-head cross-entropy")
    _opt(pre, "--fused-gelu", action=argparse.BooleanOptionalAction, help="GPT-2 GELU as one fused kernel")
    _opt(pre, "--fast-batches", action=argparse.BooleanOptionalAction, help="micro-batches gathered from the shards")
    _opt(pre, "--cpu-attention", action=argparse.BooleanOptionalAction, help="CPU, bf16: attention as matmuls, not SDPA")
    _opt(pre, "--flash-attention", action=argparse.BooleanOptionalAction,
         help="GPU: FlashAttention 3/2 when installed (flash-attn), else SDPA")
    _opt(pre, "--fp8", action="store_true", help="FP8 matmuls via torchao (Ada/Hopper GPU, --arch llama); off by default")
    _opt(pre, "--val-fraction", type=float, metavar="F")
    _opt(pre, "--eval-every", type=int, metavar="STEPS")
    _opt(pre, "--save-every", type=int, metavar="STEPS")
    _opt(pre, "--log-every", type=int, metavar="STEPS")
    _opt(pre, "--seed", type=int)
    _opt(pre, "--report-to", action="append", metavar="TOOL", help="tensorboard (default), wandb, none")
    _run_options(pre)
    pre.set_defaults(func=cmd_pretrain)

    gen = sub.add_parser("generate", help="sample text from a (base) model",
                         description="Continue a prompt with a model, streaming tokens as they come.")
    gen.add_argument("model", metavar="MODEL_DIR")
    gen.add_argument("--prompt", required=True)
    _sampling_options(gen, temperature=0.8)
    _engine_options(gen)
    gen.set_defaults(func=cmd_generate)

    tune = sub.add_parser("sft", help="fine-tune a model into a chat assistant",
                          description="Supervised fine-tuning on conversations, loss on assistant turns only "
                                      "(their closing <|im_end|> included, so the model learns to stop).")
    _opt(tune, "--model", metavar="MODEL_DIR", help="any local Hugging Face causal-LM directory")
    _opt(tune, "--data", action="append", metavar="SRC",
         help="conversations, repeatable: messages / ShareGPT / Alpaca / prompt-completion records in "
              "jsonl/json/parquet, hf:NAME[:CONFIG], or demo[:LANG]")
    _opt(tune, "--out", metavar="DIR", help="run directory (default: run-chat)")
    _opt(tune, "--max-length", type=int, metavar="N", help="tokens per conversation; longer ones keep their "
                                                             "first N tokens (default: the context window)")
    _opt(tune, "--packing", action="store_true", help="pack conversations (attention stays within each)")
    _opt(tune, "--eval-fraction", type=float, metavar="F", help="conversations held out (default: 0.05)")
    _opt(tune, "--epochs", type=float, metavar="N", help="default: 3")
    _opt(tune, "--max-steps", type=int, metavar="N")
    _opt(tune, "--max-time", type=float, metavar="SECONDS")
    _opt(tune, "--micro-batch-size", type=int, metavar="N", help="conversations per forward pass (default: 8)")
    _opt(tune, "--grad-accum", type=int, metavar="N")
    _opt(tune, "--learning-rate", type=float, metavar="LR")
    _opt(tune, "--warmup-steps", type=int, metavar="N")
    _opt(tune, "--schedule", choices=["cosine", "wsd", "constant"])
    _opt(tune, "--precision", choices=PRECISIONS)
    _opt(tune, "--lora", action="store_true", help="train LoRA adapters (PEFT) instead of all weights")
    _opt(tune, "--lora-r", type=int, metavar="R")
    _opt(tune, "--merge", action="store_true", help="with --lora: write merged full weights")
    _opt(tune, "--strict", action="store_true", help="fail on the first unusable record")
    _opt(tune, "--eval-every", type=int, metavar="STEPS")
    _opt(tune, "--save-every", type=int, metavar="STEPS")
    _opt(tune, "--log-every", type=int, metavar="STEPS")
    _opt(tune, "--seed", type=int)
    _opt(tune, "--report-to", action="append", metavar="TOOL")
    _run_options(tune)
    tune.set_defaults(func=cmd_sft)

    talk = sub.add_parser("chat", help="chat with a model in the terminal",
                          description="Multi-turn chat; tokens stream as they are generated. Type /reset to "
                                      "start over, /exit to quit.")
    talk.add_argument("model", metavar="MODEL_DIR")
    talk.add_argument("--system", help="system prompt")
    talk.add_argument("--prompt", help="answer this one message, print the answer and exit")
    _sampling_options(talk, temperature=0.7)
    _engine_options(talk)
    talk.set_defaults(func=cmd_chat)

    srv = sub.add_parser("serve", help="serve a model: OpenAI-compatible API and a web chat page",
                         description="Serve MODEL_DIR over HTTP: /v1/chat/completions, /v1/completions, "
                                     "/v1/models (OpenAI-compatible, streaming), /health, and a web chat at /.")
    srv.add_argument("model", metavar="MODEL_DIR")
    srv.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)")
    srv.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000; 0 = any free port)")
    srv.add_argument("--api-key", default=None, metavar="KEY",
                     help="require Authorization: Bearer KEY on /v1 (default: $CHATFORGE_API_KEY if set)")
    srv.add_argument("--max-batch", type=int, default=16, metavar="N", help="requests decoded together (default: 16)")
    srv.add_argument("--max-queue", type=int, default=64, metavar="N",
                     help="requests allowed to wait; more get 503 + Retry-After (default: 64)")
    srv.add_argument("--model-name", default=None, metavar="NAME", help="model id in the API (default: MODEL_DIR's name)")
    _engine_options(srv)
    srv.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ChatforgeError as err:
        print(f"chatforge: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
