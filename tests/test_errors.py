"""Bad input ends in one clear line naming the file and line/record, and a non-zero exit."""

import json

import pytest

from conftest import TINY, run_cli


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


def test_fp8_without_an_fp8_gpu(tmp_path):
    """Checked before any work: no tokenizer, shards or model are made."""
    _fails("pretrain", "--data", "demo:en", "--out", tmp_path / "run", "--fp8", match="--fp8 needs an NVIDIA GPU")
    assert not (tmp_path / "run" / "tokenizer").exists()
