"""Pretraining for real: loss falls below the unigram entropy, checkpoints are plain Hugging Face
directories, a killed run resumes to identical weights (several processes: test_distributed)."""

import dataclasses
import importlib.util
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatforge.data import unigram_entropy
from conftest import ENV, TINY, run_cli


def test_tiny_run_learns_and_loads_in_plain_transformers(base_model_dir, tokenizer_dir):
    summary = json.loads((Path(base_model_dir) / "summary.json").read_text())
    entropy = unigram_entropy(Path(base_model_dir) / "data")
    assert summary["eval_loss"] < 0.8 * entropy, (summary, entropy)
    assert summary["eval_bpb"] > 0 and summary["tokens_per_s"] > 0
    # the final model and the checkpoint are standard directories: no chatforge import needed
    code = ("import sys; from transformers import AutoModelForCausalLM, AutoTokenizer;"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1]);"
            "ids = t('Hello', return_tensors='pt').input_ids;"
            "out = m.generate(ids, max_new_tokens=5, do_sample=False);"
            "assert 'chatforge' not in sys.modules and out.shape[1] > ids.shape[1];"
            "assert t.chat_template and '<|im_end|>' in t.get_vocab(); print('ok')")
    for folder in (base_model_dir, str(Path(base_model_dir) / "checkpoint-300")):
        proc = subprocess.run([sys.executable, "-c", code, folder], capture_output=True, text=True,
                              env={k: v for k, v in ENV.items() if k != "PYTHONPATH"}, cwd="/")
        assert proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
    assert (Path(base_model_dir) / "model.safetensors").exists()
    assert (Path(base_model_dir) / "run_config.yaml").exists()


def _says_nothing_of_torchao(proc) -> None:
    """torchao, where installed (the fp8 and test extras), is imported by every model load; its CUDA kernel
    libraries missing on a CPU build and torch's enum deprecation are not the user's to read."""
    if importlib.util.find_spec("torchao"):
        assert "Failed to load" not in proc.stderr and "register_constant" not in proc.stderr, proc.stderr


def test_generate_streams_from_checkpoint(base_model_dir):
    proc = run_cli("generate", base_model_dir, "--prompt", "Hello", "--max-new-tokens", 20, "--seed", 0)
    assert proc.stdout.startswith("Hello") and len(proc.stdout.strip()) > len("Hello")
    _says_nothing_of_torchao(proc)


def test_config_reproduces_run(tmp_path, base_model_dir):
    """The saved run_config.yaml given back as --config yields the same weights."""
    rerun = tmp_path / "rerun"
    run_cli("pretrain", "--config", Path(base_model_dir) / "run_config.yaml", "--out", rerun,
            "--data", Path(base_model_dir) / "data")
    a = load_file(Path(base_model_dir) / "model.safetensors")
    b = load_file(rerun / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _pretrain_args(data, tok, out, steps):
    return ["pretrain", "--data", data, "--tokenizer", tok, "--out", out, *TINY, "--max-steps", steps,
            "--save-every", 10, "--eval-every", 1000, "--log-every", 10, "--report-to", "none"]


def test_kill_and_resume_gives_identical_weights(tmp_path, base_model_dir, tokenizer_dir):
    data = str(Path(base_model_dir) / "data")  # prepared shards, reused as --data
    steps = 120
    run_cli(*_pretrain_args(data, tokenizer_dir, tmp_path / "straight", steps))

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "chatforge", *map(str, _pretrain_args(data, tokenizer_dir, killed, steps))],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(killed.glob("checkpoint-*/chatforge_complete.json")) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(int(p.parent.name.split("-")[1]) for p in killed.glob("checkpoint-*/chatforge_complete.json"))
    assert done and done[-1] < steps, done
    # a half-written newer checkpoint (no marker) must be ignored and removed
    fake = killed / f"checkpoint-{steps - 1}"
    shutil.copytree(killed / f"checkpoint-{done[-1]}", fake, dirs_exist_ok=True)
    (fake / "chatforge_complete.json").unlink()
    (fake / "model.safetensors").write_bytes(b"truncated")

    resumed = run_cli(*_pretrain_args(data, tokenizer_dir, killed, steps), "--resume")
    assert f"resuming from {killed / f'checkpoint-{done[-1]}'}" in resumed.stdout
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(killed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"


def test_muon_checkpoint_resumes_to_the_same_weights(tmp_path, base_model_dir, tokenizer_dir):
    """--optimizer muon (Muon and AdamW chained): its checkpoint carries both optimizers' state, and a run
    resumed from it ends with the uninterrupted run's weights."""
    data = str(Path(base_model_dir) / "data")
    args = ["pretrain", "--data", data, "--tokenizer", tokenizer_dir, *TINY, "--max-steps", 6, "--save-every", 3,
            "--eval-every", 1000, "--report-to", "none", "--optimizer", "muon"]
    straight = tmp_path / "straight"
    first = run_cli(*args, "--out", straight)
    assert "muon at lr 0.006" in first.stdout
    _says_nothing_of_torchao(first)
    muon, adamw = torch.load(straight / "checkpoint-3" / "optimizer.pt", weights_only=True)["optimizers"]
    assert all("momentum_buffer" in s for s in muon["state"].values()) and len(muon["state"]) == 2 * 4
    assert all("exp_avg" in s for s in adamw["state"].values())
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    shutil.copy(straight / "chatforge_output.json", resumed)
    assert "resuming from" in run_cli(*args, "--out", resumed, "--resume").stdout
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the schedule reaches both optimizers (accelerate reloads their state after the scheduler is made)
    run_cli(*args, "--out", tmp_path / "constant", "--schedule", "constant")
    c = load_file(tmp_path / "constant" / "model.safetensors")
    assert not torch.equal(a["transformer.h.0.mlp.c_fc.weight"], c["transformer.h.0.mlp.c_fc.weight"])
    assert not torch.equal(a["transformer.wte.weight"], c["transformer.wte.weight"])


def test_resume_at_the_last_step_changes_nothing(tmp_path, base_model_dir, tokenizer_dir):
    """Killed after its last checkpoint, before the final save: --resume trains nothing more (the Trainer
    runs one step past max_steps when resumed there; the schedule makes it a no-op)."""
    out = tmp_path / "run"
    shutil.copytree(Path(base_model_dir) / "checkpoint-300", out / "checkpoint-300")
    shutil.copy(Path(base_model_dir) / "chatforge_output.json", out)
    run_cli("pretrain", "--data", Path(base_model_dir) / "data", "--tokenizer", tokenizer_dir, "--out", out, *TINY,
            "--max-steps", 300, "--learning-rate", 3e-3, "--eval-every", 100, "--save-every", 150,
            "--report-to", "none", "--resume")
    a, b = load_file(Path(base_model_dir) / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "summary.json").read_text())["steps"] == 300


def test_model_vocab_size_pads_the_embeddings(tokenizer_dir):
    from chatforge.errors import ChatforgeError
    from chatforge.text.tokenizer import load_tokenizer
    from chatforge.train.pretrain import PretrainConfig, _build_model

    tok = load_tokenizer(tokenizer_dir)
    model, _, _ = _build_model(PretrainConfig(data=["demo"], preset="tiny", n_layer=1, d_model=32, n_head=2, context_length=32,
                                           model_vocab_size=len(tok) + 100), tok, print)
    assert model.config.vocab_size == model.get_input_embeddings().weight.shape[0] == -(-(len(tok) + 100) // 64) * 64
    try:
        _build_model(PretrainConfig(data=["demo"], preset="tiny", model_vocab_size=len(tok) - 1), tok, print)
    except ChatforgeError as err:
        assert "below the tokenizer's" in str(err)
    else:
        raise AssertionError("a model vocabulary below the tokenizer's must be refused")


def test_a_token_budget_picks_the_deepest_shape_it_can_train(tokenizer_dir):
    """--preset auto --max-tokens D: the deepest depth-derived shape (width 64 per layer) with at least
    --tokens-per-param tokens per parameter; none given: the preset."""
    from chatforge.text.tokenizer import load_tokenizer
    from chatforge.train.pretrain import PretrainConfig, _build_model
    from chatforge.train.sizing import depth_shape, parameters

    tok = load_tokenizer(tokenizer_dir)
    sizes = [parameters(depth_shape(d, len(tok), 64)) for d in (1, 2, 3)]
    lines = []
    model, ctx, passes = _build_model(PretrainConfig(data=["demo"], context_length=64, max_tokens=sizes[1] * 2,
                                                     tokens_per_param=1.5), tok, lines.append)
    assert passes is None  # no corpus size given: passes unknown, so never Muon's few-passes case
    assert ctx == 64 and (model.config.n_layer, model.config.n_embd, model.config.n_head) == (2, 128, 2)
    assert sum(p.numel() for p in model.parameters()) == sizes[1] < sizes[1] * 2 / 1.5 < sizes[2]
    assert any("--tokens-per-param" in line for line in lines)
    model, _, _ = _build_model(PretrainConfig(data=["demo"], max_tokens=10), tok, print)  # less than any: depth 1
    assert model.config.n_layer == 1
    model, _, _ = _build_model(PretrainConfig(data=["demo"], max_tokens=10, n_layer=3), tok, print)  # a shape given
    assert (model.config.n_layer, model.config.n_embd) == (3, 192)


def test_a_budget_sized_muon_run_takes_bigger_batches():
    """--micro-batch-size unset, on a CPU: 4,096 tokens' worth of sequences for a budget-sized run that may train
    with Muon, else 8 (a shape given, --optimizer adamw, a preset); on a GPU always 32; given, it is kept."""
    import torch

    from chatforge.train.pretrain import PretrainConfig, micro_batch

    gpu = torch.cuda.is_available()
    cpu = lambda n: 32 if gpu else n  # noqa: E731
    sized = PretrainConfig(data=["demo"], max_time=60)
    assert [micro_batch(sized, ctx) for ctx in (128, 64, 8192)] == [cpu(32), cpu(64), cpu(1)]  # 4,096 tokens' worth
    assert micro_batch(PretrainConfig(data=["demo"], max_tokens=10**6, optimizer="muon"), 128) == cpu(32)
    for unsized in (dict(n_layer=2), dict(preset="tiny"), dict(init_from="base"), dict(optimizer="adamw")):
        assert micro_batch(PretrainConfig(data=["demo"], max_time=60, **unsized), 128) == cpu(8), unsized
    assert micro_batch(PretrainConfig(data=["demo"]), 128) == cpu(8)
    assert micro_batch(PretrainConfig(data=["demo"], max_time=60, micro_batch_size=4), 128) == 4


def test_muons_default_rate_grows_with_the_batch():
    """Muon: 6x AdamW's rate at 1,024-token steps, on a CPU times the square root of the batch up to 4x that (2x the
    rate); on a GPU (unmeasured) 6x at any batch."""
    from chatforge.train.pretrain import default_learning_rate

    assert default_learning_rate("adamw", 10**6, 4096) == 1e-3 and default_learning_rate("adamw", 10**8, 4096) == 6e-4
    for tokens, rate in ((512, 6e-3), (1024, 6e-3), (2048, 6e-3 * 2 ** 0.5), (4096, 1.2e-2), (32768, 1.2e-2)):
        assert default_learning_rate("muon", 10**6, tokens) == pytest.approx(rate)
    assert default_learning_rate("muon", 10**8, 4096) == pytest.approx(7.2e-3)
    assert default_learning_rate("muon", 10**6, 32768, gpu=True) == pytest.approx(6e-3)


def test_a_small_corpus_caps_the_budgets_model():
    """The shallow depths reach the epoch cap (a corpus seen 12 times in the budget), so Chinchilla's fit,
    made for fresh data, prefers the deepest that still does (its time falls as parameters grow); a corpus
    of 60k tokens stops it at the deepest shape with at most MAX_PARAMS_PER_UNIQUE_TOKEN parameters per
    token, and says why."""
    from chatforge.train.sizing import MAX_PARAMS_PER_UNIQUE_TOKEN, depth_shape, parameters, pick_depth

    corpus, lines = 60_000, []
    budget = lambda shapes: [min(12 * corpus, 1e13 / parameters(s)) for s in shapes]  # noqa: E731 - time ~ parameters
    uncapped = pick_depth(budget, 2048, 256, log=lambda *_: None)
    capped = pick_depth(budget, 2048, 256, unique_tokens=corpus, log=lines.append)
    cap = MAX_PARAMS_PER_UNIQUE_TOKEN * corpus
    assert parameters(capped) <= cap < parameters(depth_shape(capped.n_layer + 1, 2048, 256))
    assert uncapped.n_layer > capped.n_layer and "per token of this 0.06M-token corpus" in lines[-1]
    big = pick_depth(budget, 2048, 256, unique_tokens=100 * corpus, log=lambda *_: None)  # not binding
    assert big.n_layer == uncapped.n_layer


def test_a_time_budget_keeps_the_depth_the_fit_predicts_best():
    """Under --max-time the depth with the lowest loss Chinchilla's fit predicts for its tokens: a longer budget
    buys a deeper model, and each candidate's log line carries its prediction; the ratio rule (--max-tokens)
    keeps the deepest shape with that many tokens per parameter."""
    from chatforge.train.sizing import depth_shape, parameters, pick_depth, predicted_loss

    def budget(seconds):  # tokens ~ time / parameters, as measured steps would give
        return lambda shapes: [seconds * 3.3e10 / parameters(s) for s in shapes]

    def best_by_the_fit(seconds):
        losses = [predicted_loss(parameters(s), budget(seconds)([s])[0])
                  for s in (depth_shape(d, 8192, 128) for d in range(1, 13))]
        return 1 + losses.index(min(losses))

    lines = []  # at 200 s depth 1: tokens counted twice (a factor above ~1.3) would pick depth 2
    picks = [pick_depth(budget(seconds), 8192, 128, log=lines.append).n_layer for seconds in (200, 400, 3000)]
    assert picks == [best_by_the_fit(s) for s in (200, 400, 3000)] and picks[0] < picks[1] < picks[2]
    deepest = depth_shape(picks[-1], 8192, 128)
    line = next(line for line in reversed(lines) if line.startswith(f"  depth {picks[-1]} ("))
    assert f"predicted loss {predicted_loss(parameters(deepest), budget(3000)([deepest])[0]):.3f}" in line
    ratio = pick_depth(budget(200), 8192, 128, tokens_per_param=0.5, log=lines.append)
    assert ratio.n_layer == 3 and "beside it" not in lines[-1]


def test_a_time_budget_times_each_depth_with_the_optimizer_its_run_would_use(tokenizer_dir):
    """--max-time: a depth's tokens are the budget over its measured micro-step, forward and backward plus the
    step of the optimizer the run would take there: Muon up to MUON_MAX_PASSES passes over the corpus, else
    AdamW; --optimizer given, or several processes (AdamW), only that one is timed."""
    from chatforge.text.tokenizer import load_tokenizer
    from chatforge.train.pretrain import PretrainConfig
    from chatforge.train.sizing import MUON_MAX_PASSES, Budget, depth_shape

    tok = load_tokenizer(tokenizer_dir)
    shapes = [depth_shape(d, len(tok), 32) for d in (1, 2)]
    cfg = PretrainConfig(data=["demo"], max_time=2, context_length=32, max_epochs=100)

    def budget(corpus_tokens, processes=1, **options):
        return Budget(dataclasses.replace(cfg, **options), tok, 2, "fp32", 32, processes, corpus_tokens)

    big = budget(10**12)  # far below one pass: Muon
    big.measure(shapes)
    times = [big.measured[repr(s)] for s in shapes]
    assert all(set(t) == {"forward_backward", "adamw", "muon"} and min(t.values()) > 0 for t in times)
    for shape, t in zip(shapes, times):
        assert big.optimizer(shape) == "muon"
        assert big.tokens(shape) == pytest.approx(2 / (t["forward_backward"] + t["muon"]) * 2 * 32)
    small = budget(int(big.tokens(shapes[1], "muon") / (MUON_MAX_PASSES + 1)))  # more than 6 passes: AdamW
    small.measured = big.measured
    assert small.optimizer(shapes[1]) == "adamw" and small.passes(shapes[1]) > MUON_MAX_PASSES
    t = small.measured[repr(shapes[1])]
    assert small.tokens(shapes[1]) == pytest.approx(2 / (t["forward_backward"] + t["adamw"]) * 2 * 32)
    for one in (budget(10**12, optimizer="adamw"), budget(10**12, processes=2)):  # AdamW named, or DDP's
        one.measure(shapes[:1])
        assert set(one.measured[repr(shapes[0])]) == {"forward_backward", "adamw"}
        assert one.optimizer(shapes[0]) == "adamw"


def test_max_time_is_a_budget_across_resumes(tmp_path, base_model_dir, tokenizer_dir):
    """--max-time counts the training time of every run of one output folder: a resumed run gets what
    is left of it (recorded in each checkpoint), not a fresh budget. With --preset auto the first run
    measures this machine and sizes the model for the budget; --resume builds that shape again, unmeasured."""
    data, out = str(Path(base_model_dir) / "data"), tmp_path / "timed"
    args = ["pretrain", "--data", data, "--tokenizer", tokenizer_dir, "--out", out, "--context-length", 64,
            "--save-every", 2, "--eval-every", 10_000, "--log-every", 10_000, "--report-to", "none"]
    sized = run_cli(*args, "--max-time", 3)
    assert "--preset auto under --max-time 3 s" in sized.stdout and "tokens in the budget" in sized.stdout
    first = max(json.loads(p.read_text())["train_seconds"] for p in out.glob("checkpoint-*/chatforge_complete.json"))
    assert first >= 2.5
    saved = yaml.safe_load((out / "run_config.yaml").read_text())
    # Muon when the budget sees the corpus at most 6 times (machine speed decides here): on a CPU with 4,096 tokens
    # a step (64 sequences of 64) and twice its rate at 1,024; AdamW with 8 sequences at 1e-3
    assert "optimizer: " in sized.stdout
    if saved["optimizer"] == "muon":
        expected = (32, 6e-3) if torch.cuda.is_available() else (64, pytest.approx(1.2e-2))
        assert (saved["micro_batch_size"], saved["learning_rate"]) == expected
    else:
        assert (saved["micro_batch_size"], saved["learning_rate"]) == (32 if torch.cuda.is_available() else 8, 1e-3)
    resumed = run_cli(*args, "--max-time", 5, "--resume")
    assert "already spent before this resume" in resumed.stdout and "--preset auto" not in resumed.stdout
    model = AutoModelForCausalLM.from_pretrained(out)  # a plain HF directory of the chosen shape
    assert (model.config.n_layer, model.config.n_embd, model.config.n_head) == \
        (saved["n_layer"], saved["d_model"], saved["n_head"]) and saved["d_model"] == 64 * saved["n_layer"]
    total = max(json.loads(p.read_text())["train_seconds"] for p in out.glob("checkpoint-*/chatforge_complete.json"))
    assert 0 < total - first < 3.75  # the second run trained what was left of 5 s (about 2), not a fresh 5


def test_overwrite_retrains_a_tokenizer_made_from_other_options(tmp_path):
    """The run's own tokenizer is kept by --overwrite only while --data and --vocab-size are unchanged."""
    out = tmp_path / "run"
    args = ["pretrain", "--data", "demo:en", "--out", out, *TINY, "--max-steps", 2, "--report-to", "none",
            "--eval-every", 1000]
    run_cli(*args, "--vocab-size", 300)
    assert len(AutoTokenizer.from_pretrained(out / "tokenizer")) == 300
    kept = run_cli(*args, "--vocab-size", 300, "--overwrite")
    assert "training a" not in kept.stdout
    run_cli(*args, "--vocab-size", 400, "--overwrite")
    assert len(AutoTokenizer.from_pretrained(out / "tokenizer")) == 400
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size >= 400


def test_checkpoints_are_rotated_only_once_the_new_one_is_complete(tmp_path):
    """The Trainer deletes old checkpoints before chatforge marks the new one complete: with a limit of 1, a
    kill in between left nothing to resume from. The rotation is chatforge's now, after the marker."""
    from types import SimpleNamespace

    from chatforge.train.callbacks import CompleteMarker
    from chatforge.train.common import COMPLETE_MARKER, STARTED_MARKER, complete_checkpoints

    for step, marks in ((5, (STARTED_MARKER, COMPLETE_MARKER)), (10, (STARTED_MARKER,))):
        (tmp_path / f"checkpoint-{step}").mkdir()
        for mark in marks:
            (tmp_path / f"checkpoint-{step}" / mark).write_text("{}")
    args, state = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=10)
    assert [p.name for p in complete_checkpoints(str(tmp_path))] == ["checkpoint-5"]  # the state a kill leaves
    CompleteMarker(keep=1).on_save(args, state, None)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-10"]
    assert (tmp_path / "checkpoint-10" / COMPLETE_MARKER).exists()
