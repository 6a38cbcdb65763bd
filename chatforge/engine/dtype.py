"""The weights' dtype for decoding on a CPU with native bf16, measured once per machine and model shape.

Neither dtype wins everywhere: bf16 halves the bytes a step reads, but on some CPUs its matmuls pay a
per-call floor that small decode steps never amortise (bench/README.md: on an Intel Xeon with AMX the
tiny preset decodes 2x faster in fp32 at batch 1, on AMD Zen 4 bf16 is faster). So `--dtype auto` times a
few real decode steps in both dtypes, at batch 1 and at the engine's largest batch, and keeps the dtype
with the lower geometric mean; the answer is cached per CPU, thread count, torch, model shape and
version of the decode code. One dtype per engine: bf16 and fp32 logits differ, and greedy output must not
depend on how many requests share a step.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "chatforge" / "decode_dtype.json"
PROMPT, WARMUP, STEPS, ROUNDS = 16, 4, 16, 2


def decode_seconds(model, batch: int, context_length: int, fast: bool) -> float:
    """Seconds per generated token at `batch` requests, after a short prompt each."""
    from chatforge.engine.backends import make_backend

    backend = make_backend(model, batch, context_length, fast=fast)
    prompt = min(PROMPT, context_length // 4)
    steps = max(WARMUP + 1, min(WARMUP + STEPS, context_length - prompt - 1))
    backend.prefill(list(range(batch)), [[0] * prompt] * batch)
    start = 0.0
    for i in range(steps):
        if i == WARMUP:
            start = time.perf_counter()
        backend.decode([0] * batch, [min(prompt + i, context_length - 1)] * batch)
    return (time.perf_counter() - start) / (steps - WARMUP) / batch


def _machine_key(config, batches: list[int], fast: bool) -> str:
    from chatforge.modeling import cpu_name

    shape = "-".join(str(getattr(config, k, None)) for k in ("model_type", "num_hidden_layers", "hidden_size",
                                                             "num_attention_heads", "vocab_size"))
    return (f"{cpu_name()}|{torch.get_num_threads()} threads|torch {torch.__version__}|{shape}|batch {batches}|"
            f"fast {fast}|decode code {_decode_code()}")


@functools.cache
def _decode_code() -> str:
    """A digest of the fast backend's source: a changed decode path (an upgrade) measures again."""
    from chatforge.engine.backends import fast as fast_backend

    return hashlib.sha256(Path(fast_backend.__file__).read_bytes()).hexdigest()[:12]


def cpu_decode_dtype(model_dir: str, max_batch: int, fast: bool) -> torch.dtype:
    """fp32 or bf16 for decoding `model_dir` on this CPU (measured, then cached)."""
    from transformers import AutoConfig

    from chatforge.errors import transformers_quiet
    from chatforge.modeling import context_length, load_model

    try:
        with transformers_quiet():
            config = AutoConfig.from_pretrained(model_dir)
    except Exception:  # noqa: BLE001 - not a model directory: the engine's own load says so in one line
        return torch.float32
    batches = sorted({1, max_batch})
    key = _machine_key(config, batches, fast)
    try:
        cache = json.loads(CACHE.read_text())
    except (OSError, ValueError):
        cache = {}
    cache = cache if isinstance(cache, dict) else {}
    entry = cache.get(key)
    if isinstance(entry, dict) and isinstance(getattr(torch, str(entry.get("dtype")), None), torch.dtype):
        return getattr(torch, entry["dtype"])
    models = {name: load_model(model_dir, dtype=getattr(torch, name)).eval() for name in ("float32", "bfloat16")}
    seconds = {name: [math.inf] * len(batches) for name in models}
    with torch.inference_mode():  # rounds in alternating order, best of each: a shared machine is noisy
        for round_ in range(ROUNDS):
            for name, model in list(models.items())[::1 if round_ % 2 == 0 else -1]:
                seconds[name] = [min(t, decode_seconds(model, b, context_length(config), fast))
                                 for t, b in zip(seconds[name], batches)]
    ratio = math.prod(b / f for b, f in zip(seconds["bfloat16"], seconds["float32"])) ** (1 / len(batches))
    cache[key] = {"dtype": "bfloat16" if ratio < 1 else "float32", "bf16_over_fp32_seconds": round(ratio, 3),
                  "seconds_per_token": seconds, "batches": batches}
    _save(cache)
    return getattr(torch, cache[key]["dtype"])


def _save(cache: dict) -> None:
    """Best effort, written whole: a read-only home only means measuring again next time."""
    try:
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = CACHE.with_name(f"{CACHE.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(CACHE)
    except OSError:
        pass
