"""Every conversation format converts; every malformed record is counted (or, with --strict, an error
naming its file and line); a run with nothing to learn stops before training."""

import json

import pytest

from chatforge.text.conversations import InvalidRecord, iter_conversations, to_messages
from chatforge.text.sources import SourceStats
from conftest import run_cli

EXPECTED = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]


@pytest.mark.parametrize("record", [
    {"messages": EXPECTED},
    {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]},
    {"instruction": "Q?", "input": "", "output": "A."},
    {"prompt": "Q?", "completion": "A."},
    {"dialogue": ["Q?", "A.", "dangling user line"]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "Q"}, {"type": "text", "text": "?"}]},
                  {"role": "assistant", "content": "A."}]},  # OpenAI's content parts
])
def test_formats_convert(record):
    assert to_messages(record) == EXPECTED


def test_alpaca_input_and_sharegpt_system():
    assert to_messages({"instruction": "Translate", "input": "cat", "output": "猫"})[0]["content"] == "Translate\n\ncat"
    msgs = to_messages({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q?"},
                                          {"from": "gpt", "value": "A."}]})
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]


@pytest.mark.parametrize("record,reason", [
    ({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown role 'wizard'"),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]}, "empty content"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}, "turns out of order"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"},
                   {"role": "assistant", "content": "a"}]}, "turns out of order"),
    ({"question": "q", "answer": "a"}, "unrecognised format"),
    ({"prompt": ["q"], "completion": "a"}, "unknown role None"),
    ({"prompt": "q", "completion": [None]}, "unknown role None"),
])
def test_invalid_records(record, reason):
    with pytest.raises(InvalidRecord, match=reason):
        to_messages(record)


def test_counts_and_strict(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = {"messages": EXPECTED}
    bad = {"messages": [{"role": "user", "content": "no answer"}]}
    path.write_text("\n".join(json.dumps(r) for r in [good, bad, good, bad, bad]) + "\n")
    stats = SourceStats()
    assert len(list(iter_conversations([str(path)], stats=stats))) == 2
    assert stats.skipped == {"no assistant turn": 3}
    with pytest.raises(Exception, match=f"{path}:2: no assistant turn"):
        list(iter_conversations([str(path)], strict=True))


def test_all_dropped_stops_before_training(tmp_path, base_model_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    proc = run_cli("sft", "--model", base_model_dir, "--data", path, "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2
    assert "no usable conversation (1 records read, 1 skipped (no assistant turn))" in proc.stderr
    assert not (tmp_path / "o").exists()  # every input is checked before --out is made
    proc = run_cli("sft", "--model", base_model_dir, "--data", "demo:en", "--out", tmp_path / "o", "--max-length",
                   100000, check=False)
    assert proc.returncode == 2 and "--max-length 100000 is above the 128 positions" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_all_masked_stops_before_training(tmp_path, base_model_dir):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "word " * 50},
                                             {"role": "assistant", "content": "answer"}]}) + "\n")
    proc = run_cli("sft", "--model", base_model_dir, "--data", path, "--out", tmp_path / "o", "--max-length", 16,
                   check=False)
    assert proc.returncode == 2
    assert "1 skipped (no assistant token within --max-length 16)" in proc.stderr


def test_strict_names_file_and_line(tmp_path, base_model_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": EXPECTED}) + "\n" + json.dumps({"messages": [{"role": "x", "content": "y"}]}) + "\n")
    proc = run_cli("sft", "--model", base_model_dir, "--data", path, "--out", tmp_path / "o", "--strict", check=False)
    assert proc.returncode == 2 and f"{path}:2: unknown role 'x' (--strict)" in proc.stderr
