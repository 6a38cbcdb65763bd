"""Eval speed: the same lm-eval tasks through chatforge's engine vs lm-eval's stock `hf` model.

    python bench/eval_speed.py                  # mini preset (~14M with its vocabulary), random init
    python bench/eval_speed.py --model RUN_DIR  # a real checkpoint

Two local tasks in chatforge's task format, built from the bench corpus (a bigram chain over the demo
dialogues): a HellaSwag-shaped multiple choice (context ~60-120 tokens, 4 endings of ~10-30 tokens:
log-likelihood requests) and a generation task (short prompts, 48 new tokens, greedy). Each (side, batch
size) runs in a fresh process; the time is lm-eval's `evaluator.evaluate` over the loaded tasks (model
load and dataset load excluded, both the same work on either side). The `hf` side runs at batch 1, 8, 32
and `auto`; chatforge at its default batch in fp32 (outputs must be equal) and with its default
`--dtype auto` (on a CPU with native bf16 possibly bf16: outputs then differ by rounding). Prints a
markdown table and writes bench/results/eval_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "bench", "results")


def make_tasks(folder: str, n_mc: int, n_gen: int, seed: int = 0) -> dict[str, str]:
    from bench.corpus import make_corpus

    corpus = make_corpus(os.path.join(folder, "corpus.txt"), 0.5, seed=seed).read_text(encoding="utf-8")
    words = corpus.split()
    rng = random.Random(seed)

    def span(n: int) -> str:
        start = rng.randrange(len(words) - n)
        return " ".join(words[start:start + n])

    mc = os.path.join(folder, "mc.jsonl")
    with open(mc, "w", encoding="utf-8") as f:
        for i in range(n_mc):
            choices = [" " + span(rng.randint(6, 20)) for _ in range(4)]
            f.write(json.dumps({"context": span(rng.randint(40, 90)), "choices": choices, "gold": i % 4}) + "\n")
    gen = os.path.join(folder, "gen.jsonl")
    with open(gen, "w", encoding="utf-8") as f:
        for _ in range(n_gen):
            f.write(json.dumps({"prompt": span(rng.randint(8, 24)), "answer": "x"}) + "\n")
    return {"mc": mc, "gen": gen}


def run_side(side: str, model: str, task_file: str, batch: str, max_gen: int) -> dict:
    """In this (fresh) process: load the model and the task, time lm-eval's evaluation loop."""
    import logging

    import torch
    from lm_eval.evaluator import evaluate

    from chatforge.eval.run import load_lm_eval_tasks, task_results
    from chatforge.eval.tasks import read_task_file

    logging.getLogger("lm-eval").setLevel(logging.ERROR)
    config = read_task_file(__import__("pathlib").Path(task_file)).lm_eval_config()
    if config["output_type"] == "generate_until":
        config["generation_kwargs"] = {"until": ["\n\n"], "max_gen_toks": max_gen, "do_sample": False}
    tasks = load_lm_eval_tasks([config], None)
    if side == "chatforge":
        from chatforge.eval.lm import ChatforgeLM
        from chatforge.malloc import keep_freed_memory

        keep_freed_memory()  # as every chatforge command does (chatforge/malloc.py)

        # "dtype-auto": chatforge eval's own default dtype (on a CPU with native bf16: measured, engine/dtype.py)
        lm = ChatforgeLM(model, dtype="auto" if batch == "dtype-auto" else "fp32",
                         **({} if batch in ("default", "dtype-auto") else {"batch_size": int(batch)}))
    else:
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, device="cpu", dtype="float32",
                  batch_size=batch if batch == "auto" else int(batch), max_batch_size=64)
    started = time.perf_counter()
    results = evaluate(lm=lm, task_dict=tasks, bootstrap_iters=0, log_samples=True, verbosity="ERROR")
    seconds = time.perf_counter() - started
    samples = results["samples"][config["task"]]
    outputs = [s["filtered_resps"] for s in samples]
    return {"seconds": seconds, "metrics": task_results(results)[config["task"]]["metrics"],
            "outputs": outputs, "threads": torch.get_num_threads()}


def main() -> None:
    from chatforge.modeling import cpu_name, quiet_optional_imports

    quiet_optional_imports()  # as chatforge's commands do: no torchao load warnings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder (default: a random-init mini preset model)")
    parser.add_argument("--mc", type=int, default=200, help="multiple-choice questions (4 requests each)")
    parser.add_argument("--gen", type=int, default=64, help="generation prompts")
    parser.add_argument("--max-gen", type=int, default=48, help="new tokens per generation")
    parser.add_argument("--hf-batches", default="1,8,32,auto")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--task-file", help=argparse.SUPPRESS)
    parser.add_argument("--batch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # a child process: one measurement, JSON on the last line
        print(json.dumps(run_side(args.side, args.model, args.task_file, args.batch, args.max_gen)))
        return

    os.makedirs(RESULTS, exist_ok=True)
    work = os.path.join(RESULTS, "eval_speed")
    os.makedirs(work, exist_ok=True)
    model = args.model
    if model is None:
        from bench.decode_speed import make_random_model

        model = os.path.join(work, "mini")
        if not os.path.exists(os.path.join(model, "config.json")):
            make_random_model(model, "mini")
    tasks = make_tasks(work, args.mc, args.gen)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": ROOT}
    rows = []
    for task, path in tasks.items():
        runs = [("chatforge", "default"), ("chatforge", "dtype-auto")] + [("hf", b) for b in args.hf_batches.split(",")]
        for side, batch in runs:
            proc = subprocess.run([sys.executable, __file__, "--side", side, "--model", model, "--task-file", path,
                                   "--batch", batch, "--max-gen", str(args.max_gen)],
                                  capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"{side} batch {batch} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append({"task": task, "side": side, "batch": batch, **result})
            print(f"{task:4s} {side:9s} batch {batch:7s} {result['seconds']:7.2f} s  {result['metrics']}",
                  flush=True)
    print(f"\nCPU: {cpu_name()}, torch threads: {rows[0]['threads']}\n")
    print("| task | side | batch | seconds | chatforge speed-up | scores equal | outputs equal |")
    print("|---|---|---|---|---|---|---|")
    for task in tasks:
        ours = next(r for r in rows if r["task"] == task and r["side"] == "chatforge")
        for r in (r for r in rows if r["task"] == task):
            print(f"| {task} | {r['side']} | {r['batch']} | {r['seconds']:.2f} | "
                  f"{r['seconds'] / ours['seconds']:.2f}x | {r['metrics'] == ours['metrics']} | "
                  f"{same_outputs(r['outputs'], ours['outputs'])} |")
    for r in rows:
        del r["outputs"]
    with open(os.path.join(RESULTS, "eval_speed.json"), "w") as f:
        json.dump({"cpu": cpu_name(), "model": model, "rows": rows}, f, indent=2)


def same_outputs(a: list, b: list) -> bool:
    """Generations: equal text. Log-likelihoods: within 1e-3 nats and the same greedy flags."""
    def flat(x):
        return [v for item in x for v in (flat(item) if isinstance(item, list) else [item])]

    fa, fb = flat(a), flat(b)
    return len(fa) == len(fb) and all(abs(x - y) < 1e-3 if isinstance(x, float) else x == y for x, y in zip(fa, fb))


if __name__ == "__main__":
    main()
