"""Load test: N concurrent streaming chat clients against a live `chatforge serve` on loopback.

    python bench/serve_load.py                          # tiny preset (GPU: GPT-2 124M), random init, 32 clients, 30 s
    python bench/serve_load.py --model RUN_DIR --clients 64 --duration 60

Each client sends streaming /v1/chat/completions requests back to back until the time is up. Reports
failed requests (anything but a 200 stream ending in `data: [DONE]`), p50/p95 time to first token and
aggregate completion tokens/s. Prints a markdown table and writes bench/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

QUESTIONS = ["Hello! Who are you?", "What is the capital of France?", "Tell me a short story.",
             "How do I sort a list in Python?", "你好，今天天气怎么样？", "Give me three tips for sleeping well."]


def start_server(model: str, max_batch: int, max_queue: int) -> tuple[subprocess.Popen, str, int]:
    env = {**os.environ, "PYTHONPATH": ROOT, "CHATFORGE_QUIET": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "chatforge", "serve", model, "--port", "0", "--max-batch",
                             str(max_batch), "--max-queue", str(max_queue)], stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if "http://" not in line:
        proc.kill()
        sys.exit(f"server did not start: {line!r}")
    host, port = line.split("http://")[1].split()[0].split(":")
    return proc, host, int(port)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_request(host: str, port: int, i: int, max_tokens: int) -> tuple[bool, float | None, int]:
    """(ok, seconds to first token, completion tokens) of one streaming request."""
    start = time.perf_counter()
    ttft, tokens, done = None, 0, False
    try:
        conn = http.client.HTTPConnection(host, port, timeout=120)
        body = {"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], "max_tokens": max_tokens,
                "temperature": 0.8, "stream": True, "stream_options": {"include_usage": True}}
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            print(f"request failed: HTTP {resp.status} {resp.read()[:200]!r}", file=sys.stderr)
            return False, None, 0
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data: "):
                continue
            if line == b"data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if ttft is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - start
        conn.close()
    except Exception as err:
        print(f"request failed: {err!r}", file=sys.stderr)
        return False, None, 0
    if not done:
        print("request failed: stream ended without [DONE]", file=sys.stderr)
    return done, ttft, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: a random-init --preset)")
    ap.add_argument("--preset", choices=["tiny", "mini", "gpt2"], help="random-init shape (default: tiny on CPU, "
                    "gpt2, i.e. GPT-2 124M, on GPU)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds during which clients start requests")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "serve_load.json"))
    args = ap.parse_args()

    model = args.model
    if model is None:
        import torch
        from decode_speed import make_random_model

        preset = args.preset or ("gpt2" if torch.cuda.is_available() else "tiny")
        model = make_random_model(os.path.join(tempfile.mkdtemp(prefix="cf-load-"), preset), preset)
    proc, host, port = start_server(model, max_batch=args.clients, max_queue=2 * args.clients)
    results, lock = [], threading.Lock()
    deadline = time.perf_counter() + args.duration

    def client(c: int) -> None:
        n = 0
        while time.perf_counter() < deadline:
            r = one_request(host, port, c + n, args.max_tokens)
            with lock:
                results.append(r)
            n += 1

    start = time.perf_counter()
    server_cpu_before, client_cpu_before = _cpu_seconds(proc.pid), time.process_time()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    server_cpu = _cpu_seconds(proc.pid) - server_cpu_before
    client_cpu = time.process_time() - client_cpu_before
    proc.terminate()
    proc.wait(10)

    ok = [r for r in results if r[0]]
    ttfts = sorted(r[1] for r in ok if r[1] is not None)
    pct = lambda q: 1000 * ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] if ttfts else float("nan")  # noqa: E731
    row = {"clients": args.clients, "seconds": round(elapsed, 1), "requests": len(results), "failed": len(results) - len(ok),
           "ttft_p50_ms": round(pct(0.50), 1), "ttft_p95_ms": round(pct(0.95), 1),
           "ttft_mean_ms": round(1000 * statistics.mean(ttfts), 1) if ttfts else None,
           "completion_tokens": sum(r[2] for r in ok), "tokens_per_s": round(sum(r[2] for r in ok) / elapsed, 1),
           # the clients share the machine's cores: CPU per 1k tokens tells the server's own cost apart
           "server_cpu_s_per_1k_tokens": round(1000 * server_cpu / max(1, sum(r[2] for r in ok)), 3),
           "client_cpu_s_per_1k_tokens": round(1000 * client_cpu / max(1, sum(r[2] for r in ok)), 3)}
    print(f"\nchatforge serve on loopback, {args.clients} streaming clients, {args.duration:.0f} s, "
          f"max_tokens {args.max_tokens}, model {model}\n")
    print("| clients | requests | failed | TTFT p50 | TTFT p95 | tokens/s (aggregate) | CPU s / 1k tokens: server, "
          "clients |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {row['clients']} | {row['requests']} | {row['failed']} | {row['ttft_p50_ms']} ms | "
          f"{row['ttft_p95_ms']} ms | {row['tokens_per_s']:,.0f} | {row['server_cpu_s_per_1k_tokens']}, "
          f"{row['client_cpu_s_per_1k_tokens']} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(row, f, indent=2)
    print(f"\nwrote {args.out}")
    if row["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
