"""Pretraining throughput: `chatforge pretrain`'s real path vs a stock transformers Trainer, same run.

Both paths train the same GPT-2 shape (same config, same seed, so the same initial weights) on the
same corpus with the same tokenizer, batch, learning rate and schedule, alternating A B A B ... in one
process so that a noisy machine slows both alike. Reported per path (median over rounds): tokens/s
over the steps after `--warmup`, MFU on GPU (FLOPs/token = 6·N_matmul + 12·L·d·T over the dense bf16
peak of the card), peak memory (GPU: max allocated; CPU: peak RSS, reset before each run), time to
first step, and the validation loss after the same number of tokens, measured for both by the same
fp32 evaluation of the saved model on chatforge's held-out blocks. Every row runs with glibc keeping the
memory it frees, as the `chatforge` command sets it (chatforge/malloc.py).

- chatforge: `chatforge.train.pretrain.pretrain()` itself (Trainer + the speed switches of chatforge.train.speedups, bf16 where
  supported, `--compile` on GPU, its own compile default on a CPU), on shards from `chatforge.data.prepare`.
- stock: `Trainer` + `GPT2LMHeadModel` (sdpa) + `DataCollatorForLanguageModeling(mlm=False)` over
  run_clm-style grouped blocks (`datasets.map` tokenize + `group_texts`), `bf16=True` where supported,
  `torch_compile=True` on GPU, fused AdamW; the documents carry the same <|endoftext|> separator.

    python bench/pretrain_throughput.py                      # CPU shape: 6x384, 6 heads, seq 256, batch 8
    python bench/pretrain_throughput.py --shape gpt2         # GPU: GPT-2 124M shape, seq 1024, batch 32, compile

Prints a markdown table; writes JSON to --json (default bench/results/pretrain_<shape>.json).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
from itertools import chain
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

SHAPES = {  # n_layer, d_model, n_head, seq, micro-batch
    "cpu": (6, 384, 6, 256, 8),
    "gpt2": (12, 768, 12, 1024, 32),
}


class StepTimer(TrainerCallback):
    """The same clock for both paths: wall time at the end of every optimizer step."""

    def __init__(self, t0: float):
        self.t0, self.times = t0, []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # the heap the rows before kept (keep_freed_memory) back to the kernel, else it counts in this row's peak
            import ctypes

            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass
        try:  # Linux: writing 5 to clear_refs resets VmHWM (peak RSS) of this process
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_memory_gib() -> float | None:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def peak_flops() -> float | None:
    from chatforge.train.pretrain import _peak_flops

    return _peak_flops()


def prepare_inputs(args) -> tuple[str, str, str]:
    """Corpus (synthetic, cached), tokenizer and chatforge shards in --work."""
    from corpus import make_corpus

    from chatforge.data import DataConfig, prepare
    from chatforge.text.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer

    work = Path(args.work)
    corpus = make_corpus(work / f"corpus_{args.corpus_mb:g}mb.jsonl", args.corpus_mb)
    tok_dir = args.tokenizer or str(work / f"tok_{args.corpus_mb:g}mb")
    if not (Path(tok_dir) / "tokenizer.json").exists():
        try:
            train_tokenizer(TokenizerConfig(data=[str(corpus)], out=tok_dir, vocab_size=args.vocab_size), log=print)
        except Exception as err:  # the synthetic corpus caps the vocabulary: use what it supports
            supported = int(str(err).split("use --vocab-size ")[1].split()[0])
            print(f"vocab {args.vocab_size} too large for the corpus, using {supported}")
            train_tokenizer(TokenizerConfig(data=[str(corpus)], out=tok_dir, vocab_size=supported), log=print)
    tok = load_tokenizer(tok_dir)
    shards = str(work / f"shards_{Path(tok_dir).name}")
    prepare(DataConfig(data=[str(corpus)], out=shards), tok=tok, log=print)
    return str(corpus), tok_dir, shards


def stock_dataset(corpus: str, tok_dir: str, seq: int, work: Path):
    """run_clm.py's pipeline: datasets.map(tokenize) then group_texts into seq-token blocks.

    The training documents are chatforge's (every 200th document is validation in both), each followed
    by <|endoftext|> as chatforge does, and `group_texts` sees them all in one batch (run_clm groups 1000
    documents at a time, dropping each group's remainder): the blocks are then exactly chatforge's, in the
    same order, and the Trainer's seeded sampler visits them in the same order in both paths, so the
    validation losses differ only by what the paths compute. Prepared once before timing.
    """
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from chatforge.text.tokenizer import EOS

    tok = AutoTokenizer.from_pretrained(tok_dir)
    raw = load_dataset("json", data_files=corpus, split="train", cache_dir=str(work / "hf_cache"))
    raw = raw.filter(lambda _, i: i % 200 != 0, with_indices=True)

    def tokenize(batch):
        return tok([t + EOS for t in batch["text"]])

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total = (len(concatenated["input_ids"]) // seq) * seq
        result = {k: [t[i:i + seq] for i in range(0, total, seq)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    ds = raw.map(tokenize, batched=True, remove_columns=raw.column_names)
    return tok, ds.map(group_texts, batched=True, batch_size=None)


def training_plan(args, shape) -> dict:
    n_layer, d, heads, seq, batch = shape
    batch = args.batch or batch
    return {"n_layer": n_layer, "d_model": d, "n_head": heads, "seq": seq, "batch": batch,
            "steps": args.warmup + args.steps, "lr": args.lr, "warmup_steps": max(1, (args.warmup + args.steps) // 20)}


def run_chatforge(args, plan, tok_dir, shards, out: Path, compile: bool | None = None) -> dict:
    from chatforge.train.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(
        data=[shards], tokenizer=tok_dir, out=str(out), n_layer=plan["n_layer"], d_model=plan["d_model"],
        n_head=plan["n_head"], context_length=plan["seq"], micro_batch_size=plan["batch"],
        max_steps=plan["steps"], learning_rate=plan["lr"], warmup_steps=plan["warmup_steps"],
        eval_every=10**9, save_every=10**9, log_every=10**9, report_to=["none"], seed=args.seed,
        compile=args.chatforge_compile_default if compile is None else compile, preset="tiny", model_vocab_size=args.model_vocab)
    for flag in ("fused_loss", "fused_gelu", "fast_batches", "cpu_attention", "flash_attention"):
        setattr(cfg, flag, not args.no_fast)
    t0 = time.perf_counter()
    timer = StepTimer(t0)
    pretrain(cfg, overwrite=True, log=lambda *_: None, callbacks=(timer,))
    return {"times": timer.times, "t0": t0}


def run_stock(args, plan, stock_tok, stock_ds, out: Path) -> dict:
    from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from chatforge.modeling import resolve_precision
    from chatforge.train.common import Schedule, make_optimizer

    t0 = time.perf_counter()
    config = _stock_config(plan, stock_tok, args)
    torch.manual_seed(args.seed)  # as chatforge.modeling.new_model: the same initial weights
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    precision = resolve_precision("auto")
    targs = TrainingArguments(
        output_dir=str(out), max_steps=plan["steps"], per_device_train_batch_size=plan["batch"],
        learning_rate=plan["lr"], max_grad_norm=1.0,
        bf16=precision == "bf16", fp16=precision == "fp16", torch_compile=args.compile,
        logging_steps=10**9, save_strategy="no", eval_strategy="no", report_to="none", seed=args.seed,
        use_cpu=not torch.cuda.is_available(), dataloader_pin_memory=torch.cuda.is_available(),
        logging_nan_inf_filter=False)  # its best setting: the default checks isnan(loss), a GPU sync, every step
    timer = StepTimer(t0)
    collator = DataCollatorForLanguageModeling(stock_tok, mlm=False)
    # the same optimizer (fused AdamW, betas 0.9/0.95, decay 0.1 on matrices) and LR schedule (warm-up,
    # cosine to 10%) as chatforge: HF's own warm-up starts at LR 0 and its cosine ends at 0, which alone
    # left the 45-step validation loss 3.7% higher (4.85 vs 4.68, measured); with these both run the same
    # optimisation, so the val-loss column compares what the paths compute
    optimizer = make_optimizer(model, plan["lr"], 0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule("cosine", plan["warmup_steps"], plan["steps"]))
    trainer = Trainer(model=model, args=targs, train_dataset=stock_ds, data_collator=collator, callbacks=[timer],
                      optimizers=(optimizer, scheduler))
    trainer.train()
    trainer.save_model(str(out))
    return {"times": timer.times, "t0": t0}


def run_plain_loop(args, plan, stock_tok, shards, out: Path, nanogpt: str | None = None) -> dict:
    """Reference, not a competitor: the stock model in a hand-written loop (no Trainer) on chatforge's
    blocks, bf16 autocast where supported, the same optimizer, schedule and clipping. It shows what the
    Trainer itself costs on this machine. With `nanogpt` (the path of nanoGPT's model.py, not shipped
    here), nanoGPT's GPT of the same shape (biases, no dropout) instead; its validation loss is computed
    here, with its own forward in fp32, since it cannot be saved as a Hugging Face model."""
    from transformers import AutoModelForCausalLM

    from chatforge.data import PackedBlocks
    from chatforge.modeling import resolve_precision, torch_dtype
    from chatforge.train.common import Schedule, make_optimizer

    t0 = time.perf_counter()
    config = _stock_config(plan, stock_tok, args)
    torch.manual_seed(args.seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if nanogpt:
        import importlib.util

        spec = importlib.util.spec_from_file_location("nanogpt_model", nanogpt)
        nano = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(nano)
        model = nano.GPT(nano.GPTConfig(block_size=plan["seq"], vocab_size=config.vocab_size, n_layer=plan["n_layer"],
                                        n_head=plan["n_head"], n_embd=plan["d_model"], dropout=0.0, bias=True)).to(dev)
    else:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).to(dev)

    def loss_of(m, ids):
        if nanogpt:  # nanoGPT takes the targets already shifted and ignores -1
            return m(ids, torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-1))[1]
        return m(input_ids=ids, labels=ids).loss

    if args.compile:
        model = torch.compile(model)
    optimizer = make_optimizer(model, plan["lr"], 0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule("cosine", plan["warmup_steps"], plan["steps"]))
    blocks = PackedBlocks(shards, "train", plan["seq"])
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(args.seed)).tolist()
    precision = resolve_precision("auto")
    times = []
    for step in range(plan["steps"]):
        idx = order[step * plan["batch"]:(step + 1) * plan["batch"]]
        ids = torch.from_numpy(blocks.rows(idx)).to(dev, non_blocking=True)
        with torch.autocast(dev, dtype=torch_dtype(precision), enabled=precision != "fp32"):
            loss = loss_of(model, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    if nanogpt:
        val = PackedBlocks(shards, "val", plan["seq"])
        model.eval()
        with torch.no_grad():
            losses = [loss_of(model, torch.from_numpy(val.rows(list(range(i, min(i + 8, len(val)))))).to(dev)).item()
                      for i in range(0, len(val), 8)]
        return {"times": times, "t0": t0, "val_loss": statistics.mean(losses)}
    getattr(model, "_orig_mod", model).save_pretrained(str(out))
    return {"times": times, "t0": t0}


def _stock_config(plan, stock_tok, args):
    """The stock paths' GPT2Config: chatforge's shape and token ids, transformers' model."""
    from chatforge.modeling import ModelShape, build_config
    from chatforge.text.tokenizer import document_separator_id

    eos = document_separator_id(stock_tok)
    config = build_config(ModelShape(n_layer=plan["n_layer"], d_model=plan["d_model"], n_head=plan["n_head"],
                                     context_length=plan["seq"], vocab_size=_vocab(stock_tok, args)),
                          bos_id=eos, eos_id=eos, pad_id=stock_tok.pad_token_id)
    config.loss_type = "ForCausalLM"  # unset, transformers warns from inside the compiled forward: a graph break
    return config


def _vocab(tok, args) -> int:
    """The models' vocabulary: the tokenizer's, or --model-vocab rows (GPT-2 124M's 50,304 on the gpt2
    shape: the synthetic corpus supports only ~7.6k BPE tokens, and the LM head is a large share of
    that model's FLOPs and memory), padded to 64 as chatforge pads it."""
    from chatforge.modeling import padded_vocab

    return padded_vocab(max(len(tok), args.model_vocab or 0))


@torch.no_grad()
def val_loss(model_dir: Path, shards: str, seq: int) -> float:
    """The same yardstick for both: the saved model, stock forward, fp32, chatforge's val blocks."""
    from chatforge.data import PackedBlocks
    from chatforge.modeling import load_model

    model = load_model(str(model_dir)).eval()
    val = PackedBlocks(shards, "val", seq)
    total, count = 0.0, 0
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(dev)
    for i in range(0, len(val), 8):
        ids = torch.stack([val[j]["input_ids"] for j in range(i, min(i + 8, len(val)))]).to(dev)
        out = model(input_ids=ids, labels=ids)
        n = ids.numel() - ids.shape[0]
        total += out.loss.item() * n
        count += n
    return total / max(count, 1)


def summarize(name, runs, plan, args, flops_tok, peak) -> dict:
    tokens_per_step = plan["batch"] * plan["seq"]
    rates, firsts, mems, losses = [], [], [], []
    for r in runs:
        times = r["times"]
        rates.append(args.steps * tokens_per_step / (times[-1] - times[args.warmup - 1]))
        firsts.append(times[0] - r["t0"])
        mems.append(r["mem"])
        losses.append(r["val_loss"])
    tps = statistics.median(rates)
    return {"path": name, "tokens_per_s": tps, "tokens_per_s_runs": rates,
            "mfu": tps * flops_tok / peak if peak else None,
            "peak_memory_gib": max(m for m in mems if m is not None) if any(m is not None for m in mems) else None,
            "first_step_s": statistics.median(firsts), "val_loss": statistics.median(losses), "val_loss_runs": losses}


def main() -> None:
    from chatforge.modeling import quiet_optional_imports

    quiet_optional_imports()  # as chatforge's commands do: no torchao load warnings
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="gpt2" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=40, help="timed optimizer steps per run (after --warmup)")
    parser.add_argument("--batch", type=int, help="micro-batch (default: the shape's; smaller for a smoke test)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="A/B alternations")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--corpus-mb", type=float, help="synthetic corpus size (default: 4 on the cpu shape, "
                        "10 on gpt2: every timed step needs fresh blocks)")
    parser.add_argument("--model-vocab", type=int, help="model vocabulary rows (default: 50304 on the gpt2 shape, "
                        "as GPT-2 124M; else the tokenizer's)")
    parser.add_argument("--tokenizer", help="use this tokenizer directory instead of training one")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile in every path (default: on GPU; on a CPU chatforge decides for itself, "
                             "compiling its blocks from 384 wide, and the others run eager)")
    parser.add_argument("--chatforge-compile", action="store_true",
                        help="add a row: chatforge with --compile (on a CPU: compiled blocks), the others as "
                             "--compile says")
    parser.add_argument("--no-fast", action="store_true", help="chatforge with every speed switch off")
    parser.add_argument("--nanogpt", metavar="MODEL_PY", help="add a reference row: nanoGPT's model.py (give its path) "
                        "in the same plain loop")
    parser.add_argument("--work", default="/tmp/chatforge_bench")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from chatforge.malloc import keep_freed_memory

    # as every chatforge command does (chatforge/malloc.py); process-wide, so every row runs with it: on an AMX
    # Xeon chatforge's step took 326 ms without it and 282-286 with it (bench/README.md)
    keep_freed_memory()
    if args.compile is None:  # GPU: compiled everywhere; CPU: chatforge's own default (None), the others eager
        args.chatforge_compile_default, args.compile = (True, True) if torch.cuda.is_available() else (None, False)
    else:
        args.chatforge_compile_default = args.compile

    from chatforge.train.pretrain import flops_per_token

    shape = SHAPES[args.shape]
    plan = training_plan(args, shape)
    if args.corpus_mb is None:
        args.corpus_mb = 10 if args.shape == "gpt2" else 4
    if args.model_vocab is None and args.shape == "gpt2":
        args.model_vocab = 50304
    work = Path(args.work)
    corpus, tok_dir, shards = prepare_inputs(args)
    stock_tok, stock_ds = stock_dataset(corpus, tok_dir, plan["seq"], work)
    if len(stock_ds) < plan["steps"] * plan["batch"]:  # a second epoch would time a partial, recompiled batch
        raise SystemExit(f"{len(stock_ds)} blocks of {plan['seq']} tokens is less than the {plan['steps']} x "
                         f"{plan['batch']} the runs read: raise --corpus-mb")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device}; shape {args.shape} {plan}; {len(stock_ds)} stock blocks", flush=True)

    runs = {"chatforge": [], "stock Trainer": []}
    if args.chatforge_compile:
        runs["chatforge --compile"] = []
    if args.nanogpt:
        runs["nanoGPT model.py, plain loop (reference)"] = []
    runs["stock model, plain loop (reference)"] = []
    for rnd in range(args.rounds):  # chatforge first: a run cut short by a time limit still has its row
        order = list(runs) if rnd % 2 == 0 else list(reversed(runs))
        for name in order:
            out = work / f"run_{name.split()[0]}_{len(name)}"
            gc.collect()
            torch._dynamo.reset()  # every path compiles from scratch: comparable times to first step
            reset_peak_memory()
            if name.startswith("chatforge"):
                forced = True if name.endswith("--compile") else None
                r = run_chatforge(args, plan, tok_dir, shards, out, compile=forced)
            elif name == "stock Trainer":
                r = run_stock(args, plan, stock_tok, stock_ds, out)
            else:
                r = run_plain_loop(args, plan, stock_tok, shards, out, args.nanogpt if name.startswith("nanoGPT") else None)
            r["mem"] = peak_memory_gib()
            if "val_loss" not in r:
                r["val_loss"] = val_loss(out, shards, plan["seq"])
            rate = args.steps * plan["batch"] * plan["seq"] / (r["times"][-1] - r["times"][args.warmup - 1])
            print(f"round {rnd}: {name}: {rate:,.0f} tokens/s, val loss {r['val_loss']:.4f}", flush=True)
            runs[name].append(r)

    from transformers import GPT2Config, GPT2LMHeadModel

    probe = GPT2LMHeadModel(GPT2Config(vocab_size=_vocab(stock_tok, args), n_positions=plan["seq"],
                                       n_embd=plan["d_model"], n_layer=plan["n_layer"], n_head=plan["n_head"]))
    flops_tok = flops_per_token(probe, plan["n_layer"], plan["d_model"], plan["seq"])
    peak = peak_flops()
    rows = [summarize(name, rs, plan, args, flops_tok, peak) for name, rs in runs.items()]
    base = rows[1]["tokens_per_s"]
    mem_label = "peak GiB (GPU alloc)" if torch.cuda.is_available() else "peak RSS GiB"
    print(f"\n{args.rounds} rounds x {args.steps} timed steps (+{args.warmup} warm-up), "
          f"{plan['batch']}x{plan['seq']} tokens/step, vocab {_vocab(stock_tok, args)}, {device}\n")
    print(f"| path | tokens/s (median) | vs stock | MFU | {mem_label} | first step s | val loss |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        mfu = f"{row['mfu'] * 100:.1f}%" if row["mfu"] else "n/a (CPU)"
        mem = f"{row['peak_memory_gib']:.2f}" if row["peak_memory_gib"] is not None else "n/a"
        print(f"| {row['path']} | {row['tokens_per_s']:,.0f} | {row['tokens_per_s'] / base:.2f}x | {mfu} | {mem} | "
              f"{row['first_step_s']:.1f} | {row['val_loss']:.4f} |")
    result = {"device": device, "shape": args.shape, "plan": plan, "rounds": args.rounds, "warmup": args.warmup,
              "compile": args.compile, "flops_per_token": flops_tok, "peak_flops": peak, "rows": rows,
              "speedup": rows[0]["tokens_per_s"] / base,
              "val_loss_rel_diff": (rows[0]["val_loss"] - rows[1]["val_loss"]) / rows[1]["val_loss"]}
    path = Path(args.json or Path(__file__).parent / "results" / f"pretrain_{args.shape}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"\nspeedup {result['speedup']:.2f}x, val loss rel diff {result['val_loss_rel_diff'] * 100:+.2f}% -> {path}")


if __name__ == "__main__":
    main()
