"""Time to quality: held-out bits per byte after `chatforge pretrain --max-time S`, for several recipes.

Corpus: real text every chatforge install carries (bench/realtext.py: the docstrings of the standard library
and of the packages chatforge installs, and pydoc's topics, each paragraph once, ~26 MB), one document in
ten held out by name and never trained on. One tokenizer (8,192 tokens,
trained on the training documents) and one shard folder serve every recipe, so every run sees the
same tokens; each run is a fresh `chatforge pretrain` process with `--max-time S`. Each saved model
is then scored on the held-out documents: lm-eval's disjoint rolling windows at the model's own
context (`chatforge.eval.lm`), bits per byte = total negative log-likelihood / ln 2 / UTF-8 bytes.

Recipes (same data, same time):
- `auto`: `--preset auto`, the shape chosen for the budget (chatforge/train/sizing.py);
- `tiny`: `--preset tiny` (4 x 192, context 256);
- `nanogpt`: nanoGPT's README CPU recipe (4 layers, 4 heads, 128 wide, block 64, batch 12, LR 1e-3,
  100 warm-up steps, no dropout), trained by chatforge with its schedule fitted to the same time.

    python bench/time_to_quality.py                       # 90 s and 300 s, all three recipes
    python bench/time_to_quality.py --seconds 90 --recipes auto tiny

Prints a markdown table; writes JSON to --json (default bench/results/time_to_quality.json), each row with its
run's sizing lines (the depths `auto` timed, their tokens, the optimizer).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

RECIPES = {
    "auto": ["--preset", "auto"],
    "tiny": ["--preset", "tiny"],
    "nanogpt": ["--preset", "tiny", "--n-layer", "4", "--n-head", "4", "--d-model", "128", "--context-length", "64",
                "--micro-batch-size", "12", "--batch-tokens", "768", "--learning-rate", "1e-3",
                "--warmup-steps", "100", "--dropout", "0"],
}


def chatforge(*args) -> str:
    done = subprocess.run([sys.executable, "-m", "chatforge", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode:
        sys.exit(f"chatforge {' '.join(map(str, args))} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def heldout_bits_per_byte(model_dir: Path, texts: list[str]) -> float:
    from lm_eval.api.instance import Instance

    from chatforge.eval.lm import ChatforgeLM

    lm = ChatforgeLM(str(model_dir), dtype="fp32")
    try:
        requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
        nats = -sum(lm.loglikelihood_rolling(requests))
    finally:
        lm.close()
    return nats / math.log(2) / sum(len(t.encode("utf-8")) for t in texts)


def main() -> None:
    from chatforge.modeling import quiet_optional_imports

    quiet_optional_imports()  # as chatforge's commands do: no torchao load warnings
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, nargs="+", default=[90, 300])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--work", default="bench/results/ttq-docs", help="corpus, tokenizer, shards and runs")
    parser.add_argument("--json", default="bench/results/time_to_quality.json")
    args = parser.parse_args()

    from realtext import make_split

    work = Path(args.work)
    train, held = make_split(work / "text")
    texts = [json.loads(line)["text"] for line in held.read_text(encoding="utf-8").splitlines()]
    tok, shards = work / "tokenizer", work / "shards"
    if not (tok / "tokenizer.json").exists():
        chatforge("tokenizer", "train", "--data", train, "--vocab-size", 8192, "--out", tok)
    if not (shards / "manifest.json").exists():
        chatforge("data", "prepare", "--data", train, "--tokenizer", tok, "--out", shards)
    print(f"corpus: {train.stat().st_size / 1e6:.2f} MB training, {len(texts)} held-out documents "
          f"({sum(len(t.encode()) for t in texts) / 1e6:.2f} MB)", flush=True)

    rows = []
    for seconds in args.seconds:
        for recipe in args.recipes:
            out = work / f"run-{recipe}-{seconds:g}s"
            start = time.time()
            log = chatforge("pretrain", "--data", shards, "--tokenizer", tok, "--out", out, "--max-time", seconds,
                            "--report-to", "none", "--save-every", 10**9, "--overwrite", *RECIPES[recipe])
            wall = time.time() - start
            summary = json.loads((out / "summary.json").read_text())
            config = json.loads((out / "config.json").read_text())
            row = {"recipe": recipe, "seconds": seconds, "wall_s": round(wall, 1),
                   "shape": f"{config['n_layer']}x{config['n_embd']}, ctx {config['n_positions']}",
                   "parameters": summary["parameters"], "steps": summary.get("steps"),
                   "tokens_per_s": summary.get("tokens_per_s"),
                   "heldout_bpb": round(heldout_bits_per_byte(out, texts), 4),
                   # auto's choice: each depth's timed tokens and the optimizer (in the JSON, not printed)
                   "sizing": [line.strip() for line in log.splitlines() if line.startswith(("  depth", "optimizer:"))]}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "sizing"}), flush=True)

    print("\n| budget | recipe | shape | parameters | steps | tokens/s | held-out bits/byte | fewer bits than tiny | "
          "than nanoGPT's recipe |")
    print("|---|---|---|---|---|---|---|---|---|")

    def fewer(row, recipe):  # the relative saving against `recipe` run with the same budget
        ref = next((r["heldout_bpb"] for r in rows if r["recipe"] == recipe and r["seconds"] == row["seconds"]), None)
        return f"{(ref - row['heldout_bpb']) / ref:+.1%}" if ref and recipe != row["recipe"] else ""

    for row in rows:
        print(f"| {row['seconds']:g} s | {row['recipe']} | {row['shape']} | {row['parameters'] / 1e6:.2f}M | "
              f"{row['steps']} | {row['tokens_per_s']} | {row['heldout_bpb']} | {fewer(row, 'tiny')} | "
              f"{fewer(row, 'nanogpt')} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
