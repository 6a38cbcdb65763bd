"""Data preparation throughput: text -> packed token shards, chatforge vs the run_clm.py pipeline.

Same corpus (synthetic English, JSON lines, see corpus.py), same tokenizer, same cores, one process,
alternating A B A B. Both end with the same thing: fixed-length blocks of token ids ready to train on.

- chatforge: `chatforge.data.prepare` (Rust `encode_batch` over all cores, documents + <|endoftext|>
  appended to flat uint16 shards, validation split by document).
- run_clm: `datasets.load_dataset("json")`, `.map(tokenize, batched=True, num_proc=cores)`, then
  `.map(group_texts, batched=True, num_proc=cores)` into `--block-size` blocks, as in transformers'
  examples/pytorch/language-modeling/run_clm.py. Its Arrow cache is disabled between rounds so that every
  round tokenizes for real.

    python bench/data_throughput.py --corpus-mb 32

Prints a markdown table (MB of UTF-8 text per second, median over rounds) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from itertools import chain
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def run_chatforge(corpus: Path, tok, out: Path) -> int:
    from chatforge.data import DataConfig, prepare

    shutil.rmtree(out, ignore_errors=True)
    manifest = prepare(DataConfig(data=[str(corpus)], out=str(out)), tok=tok, log=lambda *_: None)
    return manifest["train"]["tokens"] + manifest["val"]["tokens"]


def run_clm(corpus: Path, tok, block: int, procs: int, cache: Path) -> int:
    import datasets

    datasets.disable_caching()
    shutil.rmtree(cache, ignore_errors=True)
    raw = datasets.load_dataset("json", data_files=str(corpus), split="train", cache_dir=str(cache))

    def tokenize(batch):
        return tok(batch["text"])

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total = (len(concatenated["input_ids"]) // block) * block
        result = {k: [t[i:i + block] for i in range(0, total, block)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    kw = {"num_proc": procs} if procs > 1 else {}
    ds = raw.map(tokenize, batched=True, remove_columns=raw.column_names, **kw)
    ds = ds.map(group_texts, batched=True, **kw)
    return len(ds) * block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus-mb", type=float, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--tokenizer", help="tokenizer directory (default: train an 8k BPE on 4 MB of the corpus)")
    parser.add_argument("--work", default="/tmp/chatforge_bench")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from corpus import make_corpus

    from chatforge.text.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer

    work = Path(args.work)
    corpus = make_corpus(work / f"corpus_{args.corpus_mb:g}mb.jsonl", args.corpus_mb)
    mb = corpus.stat().st_size / 1e6
    tok_dir = Path(args.tokenizer or work / "tok_data_bench")
    if not (tok_dir / "tokenizer.json").exists():
        small = make_corpus(work / "corpus_4mb.jsonl", 4)
        train_tokenizer(TokenizerConfig(data=[str(small)], out=str(tok_dir), vocab_size=7618), log=print)
    tok = load_tokenizer(str(tok_dir))
    cores = os.cpu_count() or 1
    print(f"corpus {mb:.1f} MB ({corpus}), tokenizer {tok_dir} ({len(tok)} tokens), {cores} cores", flush=True)

    times: dict[str, list[float]] = {"chatforge data.prepare": [], "run_clm datasets.map + group_texts": []}
    tokens: dict[str, int] = {}
    for rnd in range(args.rounds):
        names = list(times) if rnd % 2 == 0 else list(reversed(times))
        for name in names:
            t = time.perf_counter()
            if name.startswith("chatforge"):
                tokens[name] = run_chatforge(corpus, tok, work / "data_bench_shards")
            else:
                tokens[name] = run_clm(corpus, tok, args.block_size, cores, work / "data_bench_hf_cache")
            times[name].append(time.perf_counter() - t)
            print(f"round {rnd}: {name}: {times[name][-1]:.1f} s = {mb / times[name][-1]:.2f} MB/s", flush=True)

    rows = [{"path": name, "seconds": statistics.median(ts), "mb_per_s": mb / statistics.median(ts),
             "tokens": tokens[name], "seconds_runs": ts} for name, ts in times.items()]
    base = rows[1]["mb_per_s"]
    print(f"\n{mb:.1f} MB JSON lines, {args.rounds} rounds, {cores} cores\n")
    print("| pipeline | MB/s (median) | vs run_clm | seconds | tokens out |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['path']} | {row['mb_per_s']:.2f} | {row['mb_per_s'] / base:.2f}x | {row['seconds']:.1f} | "
              f"{row['tokens']:,} |")
    result = {"corpus_mb": mb, "cores": cores, "rounds": args.rounds, "rows": rows,
              "speedup": rows[0]["mb_per_s"] / base}
    path = Path(args.json or Path(__file__).parent / "results" / "data.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"\nspeedup {result['speedup']:.2f}x -> {path}")


if __name__ == "__main__":
    main()
