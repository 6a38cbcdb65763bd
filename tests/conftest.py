"""Shared fixtures: a real tokenizer and a real (tiny) pretrained base model, built once per session."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "true", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}
# tiny shapes keep every training test to seconds on 2 CPU cores
TINY = ["--n-layer", "2", "--d-model", "64", "--n-head", "2", "--context-length", "128"]


def run_cli(*args, check: bool = True, timeout: float = 600, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Run `python -m chatforge ARGS` for real; on unexpected failure show its output."""
    proc = subprocess.run([sys.executable, "-m", "chatforge", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**ENV, **(env or {})}, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"chatforge {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def refused(argv: list, capsys) -> str:
    """Run the CLI in this process (no interpreter start per case): exit 2 and one line; that line."""
    from chatforge import cli

    capsys.readouterr()  # what ran before (progress bars) is not this command's output
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    """A 1024-token BPE trained on the English and Chinese demo corpus."""
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    run_cli("tokenizer", "train", "--data", "demo:en", "--data", "demo:zh", "--vocab-size", 1024, "--out", out)
    return str(out)


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory, tokenizer_dir) -> str:
    """A tiny GPT-2 pretrained for a few steps on the demo corpus: the base for chat/serve tests."""
    out = tmp_path_factory.mktemp("base") / "run"
    run_cli("pretrain", "--data", "demo:en", "--data", "demo:zh", "--tokenizer", tokenizer_dir, "--out", out,
            *TINY, "--max-steps", 300, "--learning-rate", 3e-3, "--eval-every", 100, "--save-every", 150,
            "--report-to", "none")
    return str(out)


@pytest.fixture(scope="session")
def sign_habit(tmp_path_factory, base_model_dir) -> tuple[str, Path]:
    """A chat model with a habit to unlearn, for dpo and rl: taught sums (rl's arithmetic task, operands up to
    20) from labels with a sign error in 2 of 3 answers ("-7" for 7), it answers most sums negative when
    greedy and gives the right sign a third of the time when sampling. (model folder, the task's export)."""
    root = tmp_path_factory.mktemp("habit")
    run_cli("rl", "--export", root / "task", "--operand-max", 20)
    rng = random.Random(0)
    noisy = []
    for line in (root / "task" / "sft.jsonl").read_text().splitlines():
        record = json.loads(line)
        if rng.random() < 2 / 3:
            record["messages"][1]["content"] = "-" + record["messages"][1]["content"]
        noisy.append(json.dumps(record) + "\n")
    (root / "noisy.jsonl").write_text("".join(noisy))
    run_cli("sft", "--model", base_model_dir, "--data", root / "noisy.jsonl", "--out", root / "chat", "--epochs", 20,
            "--learning-rate", 2e-3, "--report-to", "none")
    return str(root / "chat"), root / "task"


@pytest.fixture(scope="session")
def never_stopping_model_dir(tmp_path_factory, tokenizer_dir) -> str:
    """A random GPT-2 with a 4096-token window whose stop tokens never win: a request runs for seconds
    unless it is cancelled (disconnects, stop buttons, full queues)."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    stops = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=4096, n_embd=64, n_layer=2, n_head=2,
                                       initializer_range=0.3, bos_token_id=stops[1], eos_token_id=stops))
    with torch.no_grad():
        model.transformer.wte.weight[stops] = 0  # logit 0: never the greedy choice
    model.generation_config.eos_token_id = stops
    path = tmp_path_factory.mktemp("slow") / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
