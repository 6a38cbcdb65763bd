"""Where a GPU pretraining step spends its time: GPT-2 124M (seq 1024, batch 32, vocab 50304, bf16) with
chatforge's speed switches and torch.compile, in a plain loop, under torch.profiler.

    python bench/gpu_profile.py [--steps 5] [--batch 32]

Prints tokens/s, MFU, and the GPU time per step by kernel kind (matmuls, attention, compiled elementwise,
optimizer, other), with the largest kernels: what a gap to the MFU target is made of.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KINDS = [("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "splitk")),
         ("attention", ("flash", "fmha", "attention", "sdpa")),
         ("optimizer", ("multi_tensor", "adam", "foreach")),
         ("compiled elementwise / reductions", ("triton",)),
         ("copies / casts", ("copy", "cast", "memcpy", "memset", "fill"))]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def main() -> None:
    from chatforge.modeling import quiet_optional_imports

    quiet_optional_imports()  # as chatforge's commands do: no torchao load warnings
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--no-compile", action="store_true", help="eager (a quick check of this script on a CPU)")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    from transformers import GPT2Config, GPT2LMHeadModel

    from chatforge.train.common import make_optimizer
    from chatforge.train.pretrain import PretrainConfig, _peak_flops, flops_per_token
    from chatforge.train.speedups import apply_speedups

    config = GPT2Config(vocab_size=50304, n_positions=args.seq, n_embd=768, n_layer=12, n_head=12, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, loss_type="ForCausalLM")
    torch.manual_seed(0)
    model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa").to(dev)
    apply_speedups(model, PretrainConfig(data=["demo"], compile=not args.no_compile), "bf16")
    step_model = model if args.no_compile else torch.compile(model)
    opt = make_optimizer(model, 6e-4, 0.1)
    ids = torch.randint(0, 50304, (args.batch, args.seq), device=dev)
    n_items = torch.tensor(ids.numel() - args.batch, device=dev)

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = step_model(input_ids=ids, labels=ids, num_items_in_batch=n_items).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(3):
        step()
    sync()
    print(f"compile + 3 warm-up steps: {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    per_step = (time.perf_counter() - t0) / args.steps
    tokens = args.batch * args.seq
    fpt = flops_per_token(model, 12, 768, args.seq)
    peak = _peak_flops()
    mfu = f"MFU {tokens / per_step * fpt / peak:.1%} of {peak / 1e12:.0f} TFLOP/s" if peak else "no MFU (CPU)"
    print(f"plain loop: {tokens / per_step:,.0f} tokens/s, {per_step * 1000:.1f} ms/step, {mfu}")
    if dev == "cpu":
        return

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        sync()
    by_kind, by_name = collections.Counter(), collections.Counter()
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if us and evt.device_type == torch.autograd.DeviceType.CUDA:
            by_kind[kind_of(evt.key)] += us / args.steps
            by_name[evt.key] += us / args.steps
    busy = sum(by_kind.values())
    print(f"\nGPU busy {busy / 1000:.1f} ms of {per_step * 1000:.1f} ms per step ({busy / 1000 / per_step / 10:.0f}%)\n")
    print("| kernel kind | ms / step | share of busy |")
    print("|---|---|---|")
    for kind, us in by_kind.most_common():
        print(f"| {kind} | {us / 1000:.2f} | {us / busy:.1%} |")
    print("\n| largest kernels | ms / step |")
    print("|---|---|")
    for name, us in by_name.most_common(12):
        print(f"| {name[:110]} | {us / 1000:.2f} |")


if __name__ == "__main__":
    main()
