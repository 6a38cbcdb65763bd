"""Bad input ends in one clear line naming the file and line/record, and a non-zero exit."""

import json

import pytest

from conftest import TINY, refused, run_cli


def _fails(*args, match: str):
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("chatforge: error:")]
    assert lines and match in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_missing_path(tmp_path):
    _fails("tokenizer", "train", "--data", tmp_path / "nope", "--out", tmp_path / "t",
           match=f"{tmp_path / 'nope'}: no such file or directory")


def test_empty_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("   \n")
    _fails("tokenizer", "train", "--data", tmp_path / "empty", "--out", tmp_path / "t", match="the corpus is empty")


def test_empty_directory(tmp_path):
    (tmp_path / "d").mkdir()
    _fails("tokenizer", "train", "--data", tmp_path / "d", "--out", tmp_path / "t", match="holds no .txt")


def test_malformed_json_line(tmp_path, tokenizer_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": broken}\n')
    _fails("data", "prepare", "--data", path, "--tokenizer", tokenizer_dir, "--out", tmp_path / "o",
           match=f"{path}:2: malformed JSON")


def test_missing_text_field(tmp_path, tokenizer_dir):
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    _fails("data", "prepare", "--data", path, "--tokenizer", tokenizer_dir, "--out", tmp_path / "o",
           match=f"{path}:2: no 'text' field (fields: body); use --text-field")


def test_vocab_too_large_for_corpus(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("a tiny corpus " * 20)
    _fails("tokenizer", "train", "--data", path, "--out", tmp_path / "t", "--vocab-size", 5000,
           match="--vocab-size 5000 is more than this corpus supports")


def test_context_length_above_positions(tmp_path, base_model_dir):
    _fails("pretrain", "--data", f"{base_model_dir}/data", "--init-from", base_model_dir, "--out", tmp_path / "o",
           "--context-length", 4096, "--max-steps", 1, match="--context-length 4096 is above the 128 positions")


def test_output_dir_holding_another_run(tmp_path, base_model_dir, tokenizer_dir):
    _fails("pretrain", "--data", f"{base_model_dir}/data", "--tokenizer", tokenizer_dir, "--out", base_model_dir,
           *TINY, "--max-steps", 1, match="already holds a run; pass --resume")


@pytest.mark.parametrize("spec,match", [("hf:", "expected hf:NAME"), ("demo:xx", "unknown demo language")])
def test_bad_source_specs(tmp_path, spec, match):
    _fails("tokenizer", "train", "--data", spec, "--out", tmp_path / "t", match=match)


def test_bad_config_file(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data: [demo]\nlearning_rat: 0.1\n")
    _fails("pretrain", "--config", cfg, "--out", tmp_path / "o", match="unknown option(s) learning_rat")
    cfg.write_text("data: [demo]\nlearning_rate: 0.1\nmax_steps: 3\nlearning-rate: 0.2\n")  # YAML keeps the last
    _fails("pretrain", "--config", cfg, "--out", tmp_path / "o",
           match="invalid YAML ('learning-rate' is given twice in \"" + str(cfg) + "\", line 4")


def test_fp8_without_an_fp8_gpu(tmp_path):
    """Checked before any work: no tokenizer, shards or model are made."""
    _fails("pretrain", "--data", "demo:en", "--out", tmp_path / "run", "--fp8", match="--fp8 needs an NVIDIA GPU")
    assert not (tmp_path / "run" / "tokenizer").exists()


@pytest.mark.parametrize("change,match", [
    ({"n_layer": 3}, "the weights do not match config.json: 12 missing (first: transformer.h.2."),
    ({"n_layer": 1}, "the weights do not match config.json: 6 unexpected (first: transformer.h.1."),
    ({"model_type": "no-such-arch"}, "cannot load as a causal LM (The checkpoint you are trying to load has model"),
])
def test_model_whose_weights_do_not_match_its_config(tmp_path, base_model_dir, capsys, change, match):
    """transformers would fill the missing layers with random values (or drop extra ones) with a warning, and
    chat, serve and eval would go on with a partly random model (6 unexpected: the layer's weights; biases and
    buffers are not counted); its paragraph-long messages are one line."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(base_model_dir, model, ignore=shutil.ignore_patterns("checkpoint-*", "data"))
    config = json.loads((model / "config.json").read_text())
    assert config["n_layer"] == 2
    (model / "config.json").write_text(json.dumps({**config, **change}))
    for argv in (["chat", model, "--prompt", "hi"], ["eval", model, "--limit", 2]):
        assert match in refused(argv, capsys)


def test_an_old_buffer_in_the_weights_is_not_a_mismatch(tmp_path, base_model_dir):
    """Older transformers saved GPT-2's `attn.masked_bias` buffer: unexpected, harmless, not refused."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(base_model_dir, model, ignore=shutil.ignore_patterns("checkpoint-*", "data"))
    weights = load_file(model / "model.safetensors")
    save_file({**weights, "transformer.h.0.attn.masked_bias": torch.tensor(-1e4)}, model / "model.safetensors",
              metadata={"format": "pt"})
    assert run_cli("generate", model, "--prompt", "hi", "--max-new-tokens", 2).returncode == 0


def test_hub_unreachable_is_one_line_at_once(tmp_path, base_model_dir):
    """No network (a host that never resolves: .invalid is reserved): one line, not huggingface_hub's ~25 s of
    retries, each logged."""
    import time

    env = {"HF_ENDPOINT": "https://hub.invalid", "HF_HUB_OFFLINE": "0"}
    for argv, match in ((["tokenizer", "train", "--data", "hf:someone/corpus", "--out", tmp_path / "t"],
                         "hf:someone/corpus: cannot reach hub.invalid (no network?); hf: sources stream"),
                        (["eval", base_model_dir, "--tasks", "hellaswag", "--limit", 2, "--out", tmp_path / "e"],
                         "task hellaswag: cannot reach hub.invalid (no network?); datasets already in")):
        start = time.monotonic()
        proc = run_cli(*argv, check=False, env=env)
        assert proc.returncode == 2 and time.monotonic() - start < 20, proc.stderr[-2000:]
        assert match in proc.stderr.strip().splitlines()[-1] and "Retrying" not in proc.stderr, proc.stderr[-2000:]


def test_overwrite_never_deletes_what_a_user_put_in_a_run(tmp_path, base_model_dir, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(base_model_dir, run, ignore=shutil.ignore_patterns("checkpoint-*"))
    (run / "NOTES.txt").write_text("my notes")
    (run / "my_eval").mkdir()
    before = sorted(p.name for p in run.iterdir())
    err = refused(["pretrain", "--data", "demo:en", "--out", run, "--overwrite", *TINY, "--max-steps", 1], capsys)
    assert f"--out {run}: besides the run chatforge wrote it holds NOTES.txt, my_eval, which --overwrite would " \
           "delete" in err
    assert sorted(p.name for p in run.iterdir()) == before


def test_a_failed_overwrite_keeps_the_run_it_would_replace(tmp_path, base_model_dir, tokenizer_dir, capsys):
    """pretrain reads its tokenizer and data after claiming --out: a run --overwrite would replace waits aside
    until they are read, and comes back if they fail; a folder made for a run that fails is removed."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(base_model_dir, run, ignore=shutil.ignore_patterns("checkpoint-*", "data"))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    bad, short = tmp_path / "bad.jsonl", tmp_path / "short.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken}\n')
    short.write_text('{"text": "hi"}\n' * 4)  # found out only after its tokens are written into --out
    for args, match in (([bad, "--tokenizer", tokenizer_dir], f"{bad}:2: malformed JSON"),
                        (["demo:en", "--tokenizer", tmp_path], "no tokenizer files"),
                        ([short, "--tokenizer", tokenizer_dir], "is less than one block")):
        err = refused(["pretrain", "--data", *args, "--out", run, "--overwrite", *TINY, "--max-steps", 1], capsys)
        assert match in err
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "run", "short.jsonl"]
    assert "no tokenizer files" in refused(["pretrain", "--data", "demo:en", "--tokenizer", tmp_path, "--out",
                                            tmp_path / "new", *TINY, "--max-steps", 1], capsys)
    assert not (tmp_path / "new").exists()


def test_a_reader_that_stops_early_ends_generate_quietly(base_model_dir):
    """`chatforge generate ... | head -c 3`: no error line, no abort from the engine's thread at exit."""
    import subprocess
    import sys

    from conftest import ENV

    proc = subprocess.Popen([sys.executable, "-m", "chatforge", "generate", base_model_dir, "--prompt", "hello",
                             "--temperature", "0", "--max-new-tokens", "200"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ENV)
    assert proc.stdout.read(3) == b"hel"
    proc.stdout.close()
    assert proc.wait(timeout=120) == 141
    assert proc.stderr.read() == b""


def test_resume_keeps_the_schedule_and_a_finished_run(tmp_path, base_model_dir, capsys):
    """The checkpoint's learning-rate schedule was fitted to the run's steps: a resume asked for more would
    train at a rate of 0 (and report it done); a finished run has nothing to resume (the Trainer would count
    a step it does not take and save a checkpoint past the end)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(base_model_dir, run, ignore=shutil.ignore_patterns("checkpoint-150"))
    before = sorted(p.name for p in run.iterdir())
    assert "the run being resumed has 300, and its checkpoint's schedule follows that" in \
        refused(["pretrain", "--out", run, "--resume", "--max-steps", 400], capsys)
    assert f"--out {run}: the run finished (its steps or --max-time); nothing to resume" in \
        refused(["pretrain", "--out", run, "--resume"], capsys)
    assert sorted(p.name for p in run.iterdir()) == before
