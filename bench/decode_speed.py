"""Decode speed: chatforge's engine vs transformers `generate()` (dynamic and static cache) on the same model.

    python bench/decode_speed.py                    # tiny and mini presets, random init (speed only)
    python bench/decode_speed.py --model RUN_DIR    # a real checkpoint

Greedy decoding, NEW tokens per request after a 16-token prompt. Batch 1 is one request's tokens/s;
8 and 32 are aggregate tokens/s of that many concurrent requests (the engine batches them continuously,
generate() gets them as one padded-free batch of equal-length prompts). Best of --repeats runs, because
a shared machine is noisy. Prints a markdown table and writes bench/results/decode_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from chatforge.engine import Engine, SamplingParams  # noqa: E402

PRESETS = {"tiny": dict(n_layer=4, d_model=192, n_head=6), "mini": dict(n_layer=6, d_model=384, n_head=6)}


def make_random_model(out: str, preset: str, arch: str = "gpt2", tokenizer_dir: str | None = None) -> str:
    """A random-init model of a chatforge preset with a real tokenizer; stop tokens can never win greedy
    decoding (their embedding rows are zero), so every request runs its full length."""
    from chatforge.modeling import ModelShape, new_model
    from chatforge.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer

    if tokenizer_dir is None:
        tokenizer_dir = os.path.join(os.path.dirname(out), "tokenizer")
        if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
            train_tokenizer(TokenizerConfig(data=["demo:en", "demo:zh"], out=tokenizer_dir, vocab_size=6000))
    tok = load_tokenizer(tokenizer_dir)
    shape = ModelShape(arch=arch, context_length=256, vocab_size=max(8192, len(tok)), **PRESETS[preset])
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


def bench_model(model_dir: str, new: int, batches: list[int], repeats: int) -> dict:
    engine = Engine(model_dir, max_batch=max(batches))
    model = engine.model
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, len(engine.tokenizer) - 100, (16,), generator=gen).tolist() for _ in range(max(batches))]
    greedy = SamplingParams(max_new_tokens=new, temperature=0)
    row = {"params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}

    def run_engine(b):
        reqs = [engine.submit(p, greedy) for p in prompts[:b]]
        for r in reqs:
            "".join(r)
            assert r.completion_tokens == new, r.completion_tokens

    def run_generate(b, cache):
        ids = torch.tensor(prompts[:b])
        kw = {"cache_implementation": "static"} if cache == "static" else {}
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, **kw)
        assert out.shape[1] == 16 + new

    for b in batches:
        run_engine(b)  # warm-up
        row[f"engine_b{b}"] = b * new / best_of(repeats, lambda: run_engine(b))
        for cache in ("dynamic", "static"):
            try:
                run_generate(b, cache)
                row[f"generate_{cache}_b{b}"] = b * new / best_of(repeats, lambda: run_generate(b, cache))
            except Exception as err:  # e.g. a static cache this model does not support
                row[f"generate_{cache}_b{b}"] = None
                row[f"generate_{cache}_error"] = str(err)[:200]
    engine.close()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="model directory (repeatable); default: tiny and mini, random")
    ap.add_argument("--arch", default="gpt2", choices=["gpt2", "llama"], help="for the random models")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "decode_speed.json"))
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    tmp = tempfile.mkdtemp(prefix="cf-decode-")
    models = {os.path.basename(os.path.abspath(m)): m for m in args.model} if args.model else {
        f"{p} ({args.arch}, random)": make_random_model(os.path.join(tmp, p), p, args.arch) for p in PRESETS}
    results = {name: bench_model(path, args.new_tokens, batches, args.repeats) for name, path in models.items()}

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\nDecode tokens/s, greedy, {args.new_tokens} new tokens after a 16-token prompt; device {device}, "
          f"torch threads {torch.get_num_threads()}, best of {args.repeats}\n")
    print("| model | params | batch | chatforge engine | generate() dynamic | generate() static | engine / dynamic |")
    print("|---|---|---|---|---|---|---|")
    fmt = lambda v: f"{v:,.0f}" if v else "n/a"  # noqa: E731
    for name, row in results.items():
        for b in batches:
            e, d, s = row[f"engine_b{b}"], row[f"generate_dynamic_b{b}"], row[f"generate_static_b{b}"]
            print(f"| {name} | {row['params_M']}M | {b} | {fmt(e)} | {fmt(d)} | {fmt(s)} | "
                  f"{e / d:.1f}x |" if d else "n/a |")
    if device == "cpu":
        print("\nGPU figures: pending (no GPU on this machine).")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": device, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                   "torch": torch.__version__, "new_tokens": args.new_tokens, "results": results}, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
