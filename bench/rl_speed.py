"""RL speed: `chatforge rl` vs the same GRPO configuration written directly against TRL's GRPOTrainer.

    python bench/rl_speed.py                   # tiny and mini presets, random init, 20 steps each side
    python bench/rl_speed.py --presets tiny --steps 40

Both sides: the built-in arithmetic task, 8 completions per prompt, 16 completions per step, 16 new tokens
each (the random model's stop tokens never win, so every completion is full length), the exact reward, beta
0.04, fp32 on a CPU. Each side runs in a fresh process; timed: the steps after the first, by the same
callback on both sides (chatforge's held-out evaluations are outside them). Prints RL steps per minute and
generated tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

GENERATIONS, BATCH, NEW_TOKENS = 8, 16, 16


def step_timer():
    """The same clock for both sides: wall time at the end of every optimizer step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        times: list = []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

    return StepTimer()


def timed(timer) -> dict:
    """Steps after the first (warm-up) and their seconds."""
    return {"steps": len(timer.times) - 1, "seconds": timer.times[-1] - timer.times[0]}


def run_chatforge(model: str, steps: int, out: str) -> dict:
    from chatforge.train.rl import RLConfig, rl

    timer = step_timer()
    rl(RLConfig(model=model, out=out, max_steps=steps, num_generations=GENERATIONS, micro_batch_size=BATCH,
                max_completion_length=NEW_TOKENS, eval_every=10**9, save_every=10**9, log_every=1,
                report_to=["none"], learning_rate=1e-5, eval_fraction=0.05), log=lambda *_: None, callbacks=(timer,))
    return timed(timer)


def run_trl(model_dir: str, steps: int, out: str) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from chatforge.modeling import resolve_precision
    from chatforge.train.rewards import exact_reward
    from chatforge.train.rl import arithmetic_items

    items = arithmetic_items(20, seed=1337)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"],
                               "regex": r["regex"]} for r in items])
    # the precision chatforge picks on this machine (GRPOConfig's own default is bf16, emulated and slow on a
    # CPU without native bf16): the comparison is of the code around TRL, not of the dtype
    precision = resolve_precision("auto")
    args = GRPOConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH, num_generations=GENERATIONS,
                      max_completion_length=NEW_TOKENS, learning_rate=1e-5, beta=0.04, temperature=1.0,
                      logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=1337,
                      bf16=precision == "bf16", fp16=precision == "fp16")
    timer = step_timer()
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=[exact_reward],
                          args=args, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(model_dir),
                          callbacks=[timer])
    trainer.train()
    return timed(timer)


def main() -> None:
    from chatforge.modeling import quiet_optional_imports

    quiet_optional_imports()  # as chatforge's commands do: no torchao load warnings
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,mini")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating order; the best counts")
    ap.add_argument("--worker", nargs=3, metavar=("SIDE", "MODEL", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        side, model, out = args.worker
        result = (run_chatforge if side == "chatforge" else run_trl)(model, args.steps, out)
        print(json.dumps(result))
        return

    from decode_speed import make_random_model

    tmp = tempfile.mkdtemp(prefix="cf-rl-")
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    rows = []
    for preset in args.presets.split(","):
        model = make_random_model(os.path.join(tmp, preset), preset)
        row: dict = {"preset": preset}
        for rnd in range(args.rounds):
            for side in ("chatforge", "trl") if rnd % 2 == 0 else ("trl", "chatforge"):
                done = subprocess.run([sys.executable, os.path.abspath(__file__), "--steps", str(args.steps),
                                       "--worker", side, model, os.path.join(tmp, f"{preset}-{side}-{rnd}")],
                                      capture_output=True, text=True, env=env)
                if done.returncode:
                    raise SystemExit(f"{side} failed:\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"{preset} round {rnd} {side}: {result}", flush=True)
                if side not in row or result["seconds"] / result["steps"] < row[side]["seconds"] / row[side]["steps"]:
                    row[side] = result
        rows.append(row)
    from chatforge.modeling import cpu_name, resolve_precision

    print(f"\nGRPO, {args.steps} steps, {BATCH} completions of {NEW_TOKENS} tokens per step ({GENERATIONS} per "
          f"prompt), {resolve_precision('auto')}, best of {args.rounds} alternating rounds, {cpu_name()}\n")
    print("| preset | chatforge steps/min | TRL steps/min | chatforge generated tokens/s | TRL | chatforge / TRL |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        rate = {s: row[s]["steps"] / row[s]["seconds"] * 60 for s in ("chatforge", "trl")}
        tps = {s: row[s]["steps"] * BATCH * NEW_TOKENS / row[s]["seconds"] for s in ("chatforge", "trl")}
        print(f"| {row['preset']} | {rate['chatforge']:.1f} | {rate['trl']:.1f} | {tps['chatforge']:,.0f} | "
              f"{tps['trl']:,.0f} | {rate['chatforge'] / rate['trl']:.2f}x |")


if __name__ == "__main__":
    main()
