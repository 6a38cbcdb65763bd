"""chatforge dpo: preference pairs in every supported format, a real (tiny) DPO run on TRL, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import refused, run_cli
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatforge.text.conversations import InvalidRecord
from chatforge.text.preferences import to_preference

PAIR = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "go away"}]}


@pytest.mark.parametrize("record", [
    {"prompt": "hi", "chosen": "hello", "rejected": "go away"},
    {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
     "rejected": [{"role": "assistant", "content": "go away"}]},
    {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
     "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}]},
    {"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "gpt", "value": "hello"},
     "rejected": {"from": "gpt", "value": "go away"}},
])
def test_every_format_gives_the_same_pair(record):
    assert to_preference(record) == PAIR


@pytest.mark.parametrize("record,reason", [
    ({"prompt": "hi", "chosen": "same", "rejected": "same"}, "the same"),
    ({"prompt": "hi", "chosen": "hello"}, "no chosen/rejected"),
    ({"prompt": "hi", "chosen": "", "rejected": "x"}, "empty content"),
    ({"prompt": [{"role": "assistant", "content": "hi"}], "chosen": "a", "rejected": "b"}, "out of order"),
])
def test_unusable_pairs_say_why(record, reason):
    with pytest.raises(InvalidRecord, match=reason):
        to_preference(record)


def write_pairs(path: Path, n: int) -> Path:
    rows = []
    for i in range(n):
        if i % 2:
            rows.append({"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.", "rejected": "I do not know."})
        else:
            rows.append({"conversations": [{"from": "human", "value": f"Say {i}."}],
                         "chosen": {"from": "gpt", "value": f"{i}."}, "rejected": {"from": "gpt", "value": "No."}})
    rows.append({"prompt": "broken", "chosen": "x", "rejected": "x"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_dpo_run_writes_a_plain_chat_model_with_rewards(base_model_dir, tmp_path):
    data = write_pairs(tmp_path / "prefs.jsonl", 16)
    out = tmp_path / "dpo"
    proc = run_cli("dpo", "--model", base_model_dir, "--data", data, "--out", out, "--max-steps", 4,
                   "--micro-batch-size", 4, "--eval-fraction", 0.25, "--learning-rate", 1e-4, "--report-to", "none")
    assert "preference pairs: 16 usable" in proc.stdout and "chosen and rejected are the same" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["train_pairs"] == 12 and summary["eval_pairs"] == 4
    assert 0 <= summary["eval_rewards/accuracies"] <= 1 and "eval_rewards/margins" in summary
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no chatforge
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and model.generation_config.eos_token_id
    assert json.loads((out / "chatforge_output.json").read_text())["kind"] == "dpo"
    assert (out / "run_config.yaml").exists()


def test_dpo_bad_input_is_one_line(base_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "x", "rejected": "x"}\n', encoding="utf-8")
    argv = ["dpo", "--model", base_model_dir, "--data", bad, "--out", tmp_path / "o"]
    assert "no usable preference pair" in refused(argv, capsys) and not (tmp_path / "o").exists()
    assert f"{bad}:1: chosen and rejected are the same" in refused([*argv, "--strict"], capsys)
    assert "--loss-type" in refused([*argv, "--loss-type", "nope"], capsys)