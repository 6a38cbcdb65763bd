"""Decode speed: chatforge's engine vs transformers `generate()` (dynamic and static cache) on the same model.

    python bench/decode_speed.py                    # tiny and mini presets (GPU: GPT-2 124M), random init
    python bench/decode_speed.py --presets gpt2     # GPT-2 124M shape, vocab 50304
    python bench/decode_speed.py --model RUN_DIR    # a real checkpoint

Greedy decoding, NEW tokens per request after a 16-token prompt. Batch 1 is one request's tokens/s;
8 and 32 are aggregate tokens/s of that many concurrent requests (the engine batches them continuously,
generate() gets them as one batch of equal-length prompts). Every (model, path, dtype) runs in a fresh
Python process (one path's OpenMP threads must not slow the next one, see chatforge.engine.Engine),
--rounds times in alternating order, each time best of --repeats runs: a shared machine is noisy. Each
path is measured with the weights in fp32 (the checkpoint's dtype, generate()'s default) and in bf16
(on a GPU only bf16 by default: `--dtypes`), and the engine also with its default, `--dtype auto`.
Prints a markdown table and writes bench/results/decode_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from chatforge.engine import Engine, SamplingParams  # noqa: E402
from chatforge.modeling import cpu_name  # noqa: E402

PRESETS = {  # shape, context, vocabulary
    "tiny": (dict(n_layer=4, d_model=192, n_head=6), 256, 8192),
    "mini": (dict(n_layer=6, d_model=384, n_head=6), 256, 8192),
    "gpt2": (dict(n_layer=12, d_model=768, n_head=12), 1024, 50304),  # GPT-2 124M: the GPU target's model
}


def make_random_model(out: str, preset: str, arch: str = "gpt2", tokenizer_dir: str | None = None) -> str:
    """A random-init model of a chatforge preset with a real tokenizer; stop tokens can never win greedy
    decoding (their embedding rows are zero), so every request runs its full length."""
    from chatforge.modeling import ModelShape, new_model
    from chatforge.text.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer

    if tokenizer_dir is None:
        tokenizer_dir = os.path.join(os.path.dirname(out), "tokenizer")
        if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
            train_tokenizer(TokenizerConfig(data=["demo:en", "demo:zh"], out=tokenizer_dir, vocab_size=6000))
    tok = load_tokenizer(tokenizer_dir)
    dims, ctx, vocab = PRESETS[preset]
    shape = ModelShape(arch=arch, context_length=ctx, vocab_size=max(vocab, len(tok)), **dims)
    model = new_model(shape, tok, seed=0)
    with torch.no_grad():
        stops = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        model.get_input_embeddings().weight[stops] = 0
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(model_dir: str, path: str, dtype: str, new: int, batches: list[int], repeats: int) -> dict:
    """tokens/s of one path at each batch size (run in a worker process)."""
    from chatforge.text.tokenizer import load_tokenizer

    n_vocab = len(load_tokenizer(model_dir))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, n_vocab - 100, (16,), generator=gen).tolist() for _ in range(max(batches))]
    greedy = SamplingParams(max_new_tokens=new, temperature=0)
    row = {}
    if path in ("engine", "eager"):  # eager: the engine without CUDA graphs (GPU; the same as engine on CPU)
        from chatforge.malloc import keep_freed_memory

        keep_freed_memory()  # as every chatforge command does (chatforge/malloc.py)
        engine = Engine(model_dir, max_batch=max(batches), dtype=dtype, static=False if path == "eager" else None)
        row["params_M"] = round(sum(p.numel() for p in engine.model.parameters()) / 1e6, 1)
        row["chosen"] = str(next(engine.model.parameters()).dtype).removeprefix("torch.")  # what auto picked

        def run(b):
            reqs = [engine.submit(p, greedy) for p in prompts[:b]]
            for r in reqs:
                "".join(r)
                assert r.completion_tokens == new, r.completion_tokens
    else:
        from chatforge.modeling import load_model, torch_dtype

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_model(model_dir, dtype=torch_dtype(dtype)).to(device)
        kw = {"cache_implementation": "static"} if path == "static" else {}

        def run(b):
            ids = torch.tensor(prompts[:b], device=device)
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                     min_new_tokens=new, do_sample=False, **kw)
            assert out.shape[1] == 16 + new

    for b in batches:
        try:
            run(b)  # warm-up
            row[b] = b * new / best_of(repeats, lambda: run(b))
        except Exception as err:  # e.g. a static cache this model does not support
            row[b], row["error"] = None, str(err)[:200]
    if path in ("engine", "eager"):
        engine.close()
    return row


# generate()'s static cache compiles per batch shape (slow to start): last, so a time limit cuts it first
PATHS = [("engine", "auto"), ("engine", "bf16"), ("engine", "fp32")] + ([("eager", "bf16")] if torch.cuda.is_available() else []) + [
    ("dynamic", "fp32"), ("dynamic", "bf16"), ("static", "fp32"), ("static", "bf16")]


def bench_model(model_dir: str, args, batches: list[int]) -> dict:
    """Every path in a fresh worker process, --rounds times in alternating order (forward, then reversed),
    so that a slow spell of a shared machine hits all paths alike; the best run of each path counts."""
    row: dict = {}
    for rnd in range(args.rounds):
        paths = [(path, dtype) for path, dtype in PATHS if dtype in args.dtypes.split(",")
                 and (not args.paths or path in args.paths.split(","))]
        for path, dtype in (paths if rnd % 2 == 0 else paths[::-1]):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", model_dir, "--path", path, "--dtype", dtype,
                   "--new-tokens", str(args.new_tokens), "--batches", args.batches, "--repeats", str(args.repeats)]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.worker_timeout)
            except subprocess.TimeoutExpired:  # e.g. generate()'s static cache compiling: the other paths go on
                row[f"{path}_{dtype}_error"] = f"timed out after {args.worker_timeout} s"
                print(f"  round {rnd}: {os.path.basename(model_dir)} {path} {dtype}: timed out", flush=True)
                continue
            if done.returncode != 0:
                raise SystemExit(f"worker failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            row["params_M"] = result.pop("params_M", row.get("params_M"))
            if "chosen" in result:
                row[f"{path}_{dtype}_dtype"] = result.pop("chosen")
            for key, value in result.items():
                name = f"{path}_{dtype}_{'b' + key if key != 'error' else key}"
                row[name] = value if key == "error" or not row.get(name) else max(row[name], value or 0)
            print(f"  round {rnd}: {os.path.basename(model_dir)} {path} {dtype}: {result}", flush=True)
    return row


def main() -> None:
    from chatforge.modeling import quiet_optional_imports

    quiet_optional_imports()  # as chatforge's commands do: no torchao load warnings
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="model directory (repeatable); default: random --presets")
    ap.add_argument("--presets", default="gpt2" if torch.cuda.is_available() else "tiny,mini",
                    help=f"random-init models to build ({', '.join(PRESETS)}; default: tiny,mini on CPU, gpt2 on GPU)")
    ap.add_argument("--arch", default="gpt2", choices=["gpt2", "llama"], help="for the random models")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--dtypes", default="bf16" if torch.cuda.is_available() else "auto,fp32,bf16",
                    help="weight dtypes to measure (default: bf16 on GPU, the target's; on CPU auto (the engine's "
                         "measured choice, engine/dtype.py), fp32 and bf16)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per worker (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="workers per path, in alternating order")
    ap.add_argument("--paths", help="only these of engine, eager, dynamic, static (default: all)")
    ap.add_argument("--worker-timeout", type=float, default=600, help="seconds one path's worker may take")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "decode_speed.json"))
    ap.add_argument("--worker", metavar="MODEL_DIR", help=argparse.SUPPRESS)  # one measurement, JSON on stdout
    ap.add_argument("--path", choices=["engine", "eager", "dynamic", "static"], help=argparse.SUPPRESS)
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp32"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.worker:
        row = measure(args.worker, args.path, args.dtype, args.new_tokens, batches, args.repeats)
        print(json.dumps({str(k): v for k, v in row.items()}))
        return

    tmp = tempfile.mkdtemp(prefix="cf-decode-")
    models = {os.path.basename(os.path.abspath(m)): m for m in args.model} if args.model else {
        f"{p} ({args.arch}, random)": make_random_model(os.path.join(tmp, p), p, args.arch)
        for p in args.presets.split(",")}
    results = {name: bench_model(path, args, batches) for name, path in models.items()}

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\nDecode tokens/s, greedy, {args.new_tokens} new tokens after a 16-token prompt; device {device}, "
          f"torch threads {torch.get_num_threads()}, best of {args.rounds} rounds x {args.repeats} runs; "
          "engine default: --dtype auto (on a CPU with native bf16: measured per model, engine/dtype.py)\n")
    print("| model | batch | engine bf16 | engine fp32 | generate() fp32 dynamic / static | generate() bf16 dynamic / "
          "static | engine / best generate(), fp32 | same, bf16 | engine default / generate() default (fp32 dynamic) |")
    print("|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v: f"{v:,.0f}" if v else "n/a"  # noqa: E731
    ratio = lambda a, b: f"{a / b:.1f}x" if a and b else "n/a"  # noqa: E731
    for name, row in results.items():
        for b in batches:
            get = lambda path, dt: row.get(f"{path}_{dt}_b{b}")  # noqa: E731
            best = {dt: max([v for v in (get("dynamic", dt), get("static", dt)) if v] or [0]) for dt in ("fp32", "bf16")}
            print(f"| {name}, {row['params_M']}M | {b} | {fmt(get('engine', 'bf16'))} | {fmt(get('engine', 'fp32'))} | "
                  f"{fmt(get('dynamic', 'fp32'))} / {fmt(get('static', 'fp32'))} | "
                  f"{fmt(get('dynamic', 'bf16'))} / {fmt(get('static', 'bf16'))} | "
                  f"{ratio(get('engine', 'fp32'), best['fp32'])} | {ratio(get('engine', 'bf16'), best['bf16'])} | "
                  f"{ratio(get('engine', 'auto'), get('dynamic', 'fp32'))} ({row.get('engine_auto_dtype', '?')}) |")
    if device == "cpu":
        print("\nGPU figures: pending (no GPU on this machine).")
    else:
        for name, row in results.items():
            print(f"\n{name}: engine bf16 without CUDA graphs (--enforce-eager): " + ", ".join(
                f"batch {b} {fmt(row.get(f'eager_bf16_b{b}'))}" for b in batches))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": device, "threads": torch.get_num_threads(), "cpu": cpu_name(),
                   "torch": torch.__version__, "new_tokens": args.new_tokens,
                   "results": results}, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
