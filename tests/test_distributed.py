"""Beyond one process, on CPU with gloo: DDP, FSDP2 through the Trainer (equal to DDP, full HF directories,
resumed after a kill to identical weights) and two "nodes" on loopback that lose one node and resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ENV, TINY
from test_rl import refused

STEPS = 40  # the kills land after checkpoint-10, well before the end
# on the CPU also where a GPU is; one thread per process: the processes share the cores
DIST_ENV = {**ENV, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _args(data: str, tok: str, out: Path, *extra) -> list[str]:
    return ["-m", "chatforge", "pretrain", "--data", data, "--tokenizer", tok, "--out", str(out), *TINY,
            "--max-steps", str(STEPS), "--save-every", "10", "--eval-every", "1000", "--log-every", "10",
            "--report-to", "none", "--precision", "fp32", *map(str, extra)]  # fp32: equal to reduction order


def _torchrun(*launch, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *map(str, launch), *args]


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=DIST_ENV, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


def _start_killable(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=DIST_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for_checkpoint(out: Path, step: int, procs: list[subprocess.Popen]) -> None:
    marker = out / f"checkpoint-{step}" / "chatforge_complete.json"
    deadline = time.time() + 240
    while not marker.exists():
        assert time.time() < deadline and all(p.poll() is None for p in procs), "no checkpoint before the kill"
        time.sleep(0.05)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers at once (they are not in its process group), as a machine dies."""
    import psutil  # accelerate's dependency

    for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        p.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def data(base_model_dir) -> str:
    return str(Path(base_model_dir) / "data")  # prepared shards, reused as --data


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, data, tokenizer_dir) -> Path:
    """One node, two processes, DDP: the reference of every other layout."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    _run(_torchrun("--nproc_per_node", 2, "--master_port", 29561, args=_args(data, tokenizer_dir, out)))
    return out


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, data, tokenizer_dir) -> Path:
    out = tmp_path_factory.mktemp("fsdp") / "run"
    _run(_torchrun("--nproc_per_node", 2, "--master_port", 29562, args=_args(data, tokenizer_dir, out, "--fsdp")))
    return out


def test_two_process_ddp(ddp_run):
    summary = json.loads((ddp_run / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert "batch_tokens: 2048" in (ddp_run / "run_config.yaml").read_text()  # 2 processes x 8 x 128 tokens
    AutoModelForCausalLM.from_pretrained(ddp_run)
    AutoTokenizer.from_pretrained(ddp_run)


def test_fsdp_equals_ddp_and_saves_full_hugging_face_directories(ddp_run, fsdp_run):
    """FSDP2 shards, then gathers on save: the same training as DDP (to reduction order), and every saved
    folder a plain HF directory with the tied embedding stored once, as a DDP run stores it."""
    ddp, fsdp = _weights(ddp_run), _weights(fsdp_run)
    assert ddp.keys() == fsdp.keys()
    assert max((ddp[k] - fsdp[k]).abs().max().item() for k in ddp) < 1e-4
    assert (fsdp_run / f"checkpoint-{STEPS}" / "pytorch_model_fsdp.bin").exists()  # it did shard
    for folder in (fsdp_run, fsdp_run / f"checkpoint-{STEPS}"):
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.lm_head.weight is model.transformer.wte.weight
        AutoTokenizer.from_pretrained(folder)


def test_fsdp_run_killed_resumes_to_identical_weights(tmp_path, data, tokenizer_dir, fsdp_run):
    out = tmp_path / "killed"
    cmd = _torchrun("--nproc_per_node", 2, "--master_port", 29563, args=_args(data, tokenizer_dir, out, "--fsdp"))
    proc = _start_killable(cmd)
    _wait_for_checkpoint(out, 10, [proc])
    _kill(proc)
    assert not (out / "checkpoint-40").exists()
    resumed = _run(cmd + ["--resume"])
    assert f"resuming from {out / 'checkpoint-10'}" in resumed.stdout, resumed.stdout
    a, b = _weights(fsdp_run), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed FSDP run differs from the uninterrupted one"


def test_sharded_checkpoint_is_resumed_only_sharded(tmp_path, fsdp_run, data, tokenizer_dir, capsys):
    """One process cannot load FSDP's optimizer shards: one line that says how, not a traceback."""
    out = tmp_path / "one"
    (out / f"checkpoint-{STEPS}").mkdir(parents=True)
    for f in (fsdp_run / f"checkpoint-{STEPS}").iterdir():
        (out / f"checkpoint-{STEPS}" / f.name).write_bytes(f.read_bytes())
    (out / "chatforge_output.json").write_bytes((fsdp_run / "chatforge_output.json").read_bytes())
    err = refused(_args(data, tokenizer_dir, out, "--resume")[2:], capsys)
    assert "was written by a fsdp run: resume it with --fsdp under torchrun" in err


def test_two_nodes_lose_one_and_resume_to_one_nodes_weights(tmp_path, data, tokenizer_dir, ddp_run):
    """torchrun --nnodes 2 --rdzv-endpoint on loopback, one process per node: the same weights as one node
    with two processes. One node dies after a checkpoint: the other stops (no hang), and --resume on both
    continues from the last complete checkpoint."""
    out = tmp_path / "nodes"

    def nodes(port: int, *extra) -> list[subprocess.Popen]:
        launch = ("--nnodes", 2, "--nproc_per_node", 1, "--rdzv-backend", "c10d", "--rdzv-endpoint",
                  f"127.0.0.1:{port}", "--rdzv-id", f"job{port}")
        return [_start_killable(_torchrun(*launch, args=_args(data, tokenizer_dir, out, *extra))) for _ in range(2)]

    first = nodes(29564)
    _wait_for_checkpoint(out, 10, first)
    _kill(first[1])
    try:
        assert first[0].wait(timeout=120) != 0, "the surviving node finished a run that lost a node"
    except subprocess.TimeoutExpired:
        _kill(first[0])
        raise AssertionError("the surviving node hung after the other died") from None
    assert not (out / "model.safetensors").exists()

    second = nodes(29565, "--resume")
    for proc in second:
        assert proc.wait(timeout=300) == 0
    a, b = _weights(ddp_run), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a), "two nodes differ from one node with two processes"


def test_sft_under_fsdp(tmp_path, base_model_dir):
    out = tmp_path / "sft"
    _run(_torchrun("--nproc_per_node", 2, "--master_port", 29566,
                   args=["-m", "chatforge", "sft", "--model", base_model_dir, "--data", "demo:en", "--out", str(out),
                         "--max-steps", "4", "--micro-batch-size", "4", "--eval-every", "1000",
                         "--report-to", "none", "--fsdp"]))
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and model.lm_head.weight is model.transformer.wte.weight
