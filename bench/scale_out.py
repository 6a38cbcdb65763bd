"""Beyond one process: what `data prepare` costs in memory as the corpus grows, what sharded preparation
buys, and what FSDP saves per process against DDP. Every figure comes from a fresh process.

1. `chatforge data prepare` peak RSS on the synthetic corpus (corpus.py) at 1x and 4x its size: the
   corpus streams through, so memory stays flat.
2. Sharded preparation of the 4x corpus, K = 2: one worker over everything; two workers at once on this machine, then
   `data merge`; one worker alone (what each of two machines would spend).
3. Training memory with 2 processes (gloo, CPU): DDP vs `--fsdp`, each rank's model states (its
   parameters, gradients and AdamW moments as held between steps), its RSS during the training steps (and its whole-process peak: start-up builds the full model, the final save gathers it on rank 0)
   and tokens/s, on the GPT-2 124M shape (context 128, micro-batch 2: a step takes seconds on a CPU).

    python bench/scale_out.py --corpus-mb 16 --preset gpt2-small

Prints markdown tables; `--json FILE` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ENV = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
       "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}


def run(argv: list, env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of one chatforge command in a fresh process."""
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "chatforge", *map(str, argv)], env={**ENV, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"chatforge {' '.join(map(str, argv))} failed:\n{proc.stderr.read().decode()[-3000:]}")
    return time.time() - start, usage.ru_maxrss / 2**20


def prepare_memory(work: Path, corpus_mb: float, tok: Path) -> list[dict]:
    from corpus import make_corpus

    rows = []
    for scale in (1, 4):
        corpus = make_corpus(work / f"corpus-{scale}x.jsonl", corpus_mb * scale)
        out = work / f"shards-{scale}x"
        shutil.rmtree(out, ignore_errors=True)
        seconds, rss = run(["data", "prepare", "--data", corpus, "--tokenizer", tok, "--out", out])
        rows.append({"corpus_mb": round(corpus.stat().st_size / 2**20, 1), "seconds": round(seconds, 1),
                     "peak_rss_gib": round(rss, 3)})
    return rows


def sharded_prepare(work: Path, corpus: Path, tok: Path) -> list[dict]:
    def prepare(out: Path, *part) -> list:
        shutil.rmtree(out, ignore_errors=True)
        return ["data", "prepare", "--data", corpus, "--tokenizer", tok, "--out", out, *part]

    mb = corpus.stat().st_size / 2**20
    rows = []
    seconds, _ = run(prepare(work / "one"))
    rows.append({"layout": "1 worker", "seconds": round(seconds, 1), "mb_per_s": round(mb / seconds, 2)})
    parts = [work / "part0", work / "part1"]
    start = time.time()
    procs = [subprocess.Popen([sys.executable, "-m", "chatforge", *map(str, prepare(p, "--num-shards", 2,
                                                                                  "--shard-index", i))],
                              env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for i, p in enumerate(parts)]
    assert all(p.wait() == 0 for p in procs)
    shutil.rmtree(work / "merged", ignore_errors=True)
    run(["data", "merge", *parts, "--out", work / "merged"])
    seconds = time.time() - start
    rows.append({"layout": "2 workers at once on this machine, + merge", "seconds": round(seconds, 1),
                 "mb_per_s": round(mb / seconds, 2)})
    seconds, _ = run(prepare(work / "alone", "--num-shards", 2, "--shard-index", 0))
    rows.append({"layout": "1 of 2 workers alone (a machine each)", "seconds": round(seconds, 1),
                 "mb_per_s": round(mb / seconds, 2)})
    return rows


def training_memory(work: Path, shards: Path, tok: Path, preset: str, steps: int) -> list[dict]:
    rows = []
    for name, extra in (("DDP", []), ("FSDP", ["--fsdp"])):
        out = work / f"train-{name}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29591",
               __file__, "--worker", "--data", shards, "--tokenizer", tok, "--out", out, "--preset", preset,
               "--steps", steps, *extra]
        proc = subprocess.run(list(map(str, cmd)), env={**ENV, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
                              capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        ranks = [json.loads((out / f"rss-rank{r}.json").read_text()) for r in range(2)]
        summary = json.loads((out / "summary.json").read_text())
        rows.append({"layout": name, "parameters_m": round(summary["parameters"] / 1e6, 1),
                     "model_states_gib_per_rank": " / ".join(f"{r['model_states_gib']:.2f}" for r in ranks),
                     "training_rss_gib_per_rank": " / ".join(f"{r['steps_peak_gib']:.2f}" for r in ranks),
                     "process_peak_gib_per_rank": " / ".join(f"{r['process_peak_gib']:.2f}" for r in ranks),
                     "tokens_per_s": summary["tokens_per_s"]})
    return rows


def worker(args) -> None:
    """One rank of a training-memory run: pretrain with a callback that samples this process's RSS at every
    step end from step 2 on (the training loop's memory: not the start-up or the gathered final save)."""
    import resource

    import psutil
    import torch
    from transformers import TrainerCallback

    from chatforge.train.pretrain import PretrainConfig, pretrain

    def local_bytes(tensors) -> int:
        return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors if t is not None)

    class RSS(TrainerCallback):
        peak = states = 0.0

        def on_step_end(self, targs, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step >= 2:
                self.peak = max(self.peak, psutil.Process().memory_info().rss / 2**30)
                params = list(model.parameters())
                moments = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
                self.states = (local_bytes(params) + local_bytes(p.grad for p in params)
                               + local_bytes(moments)) / 2**30

    sampler = RSS()
    cfg = PretrainConfig(data=[args.data], tokenizer=args.tokenizer, out=args.out, preset=args.preset,
                         context_length=128, micro_batch_size=2, max_steps=args.steps, eval_every=10_000,
                         save_every=10_000, log_every=1, report_to=["none"], fsdp=args.fsdp)
    pretrain(cfg, overwrite=True, log=lambda *_: None, callbacks=(sampler,))
    rank = os.environ.get("RANK", "0")
    Path(args.out, f"rss-rank{rank}.json").write_text(json.dumps(
        {"steps_peak_gib": sampler.peak, "model_states_gib": sampler.states, "process_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus-mb", type=float, default=16)
    parser.add_argument("--preset", default="gpt2-small")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--work", default="/tmp/chatforge_scale_out")
    parser.add_argument("--json", default=None)
    # one rank of a training-memory run (started by torchrun from this script)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--data", "--tokenizer", "--out"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from corpus import make_corpus

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus = make_corpus(work / "corpus-1x.jsonl", args.corpus_mb)
    tok = work / "tok"
    if not (tok / "tokenizer.json").exists():
        run(["tokenizer", "train", "--data", corpus, "--vocab-size", 4096, "--out", tok])
    results = {"prepare_memory": prepare_memory(work, args.corpus_mb, tok),
               "sharded_prepare": sharded_prepare(work, work / "corpus-4x.jsonl", tok),
               "training_memory": training_memory(work, work / "one", tok, args.preset, args.steps)}
    for name, rows in results.items():
        print(f"\n{name}\n\n{table(rows)}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
