"""`chatforge rl` for real: the procedural task, every reward function, a tiny GRPO run with resume, bad input."""

from __future__ import annotations

import json
import re

import pytest

from chatforge.train.rewards import code_reward, exact_reward, format_reward, reward_functions
from chatforge.train.rl import arithmetic_items
from conftest import refused, run_cli


def _said(completions: list[str]) -> list[list[dict]]:
    """Completions as TRL hands conversational ones to reward functions."""
    return [[{"role": "assistant", "content": c}] for c in completions]


def test_arithmetic_task_export(tmp_path):
    """Seeded, every pair once, held-out prompts never trained on; exported as sft conversations and as
    `chatforge eval` task files."""
    assert arithmetic_items(5, seed=1) == arithmetic_items(5, seed=1) != arithmetic_items(5, seed=2)
    assert len({r["prompt"] for r in arithmetic_items(5, seed=1)}) == 36
    run_cli("rl", "--export", tmp_path / "task", "--operand-max", 9)
    read = lambda name: [json.loads(x) for x in (tmp_path / "task" / name).read_text().splitlines()]  # noqa: E731
    train, held, sft = read("train.jsonl"), read("heldout.jsonl"), read("sft.jsonl")
    assert len(train) + len(held) == 100 and len(held) == 20
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    a, b = map(int, re.findall(r"\d+", train[0]["prompt"]))
    assert sft[0]["messages"][1]["content"] == train[0]["answer"] == str(a + b)
    from chatforge.eval.tasks import read_task_file

    assert read_task_file(tmp_path / "task" / "heldout.jsonl").kind == "generate_until"
    again = run_cli("rl", "--export", tmp_path / "task", "--operand-max", 9)  # its own output: replaced
    assert "80 training and 20 held-out" in again.stdout


def test_rewards(tmp_path):
    answers, regex = ["12", "12", "12", "12"], [r"-?\d+"] * 4
    said = _said(["12", "It is 12.", "13", "twelve"])
    assert exact_reward(None, said, answer=answers, regex=regex) == [1.0, 1.0, 0.0, 0.0]
    # the first line only, as chatforge eval reads it; a regex group that takes no part is no answer
    assert exact_reward(None, ["I think\n12", "x"], answer=["12", "x"], regex=[r"-?\d+", r"(\d+)|(x)"]) == [0.0, 0.0]
    assert format_reward(None, said, regex=regex) == [1.0, 0.0, 1.0, 0.0]
    # no regex: the first line is the answer (as chatforge eval reads a generation), one line is the format
    assert exact_reward(None, ["Paris.\nMore text", "paris", "Lyon"], answer=["Paris"] * 3) == [1.0, 1.0, 0.0]
    assert format_reward(None, ["Paris", "Paris\nand more", " "]) == [1.0, 0.0, 0.0]
    tests = ["assert add(2, 3) == 5"] * 3
    programs = ["def add(a, b):\n    return a + b", "def add(a, b):\n    return a - b", "while True: pass"]
    assert code_reward(None, _said(programs), test=tests) == [1.0, 0.0, 0.0]
    mine = tmp_path / "my_reward.py"
    mine.write_text("def short(prompts, completions, **kw):\n    return [1.0 / (1 + len(c)) for c in completions]\n"
                    "def boom(prompts, completions, **kw):\n    raise KeyError('answer')\n"
                    "def few(prompts, completions, **kw):\n    return [1.0]\n"
                    "def word(prompts, completions, **kw):\n    return ['good' for c in completions]\n"
                    "def leave(prompts, completions, **kw):\n    raise SystemExit(3)\n"
                    "def endless(prompts, completions, **kw):\n    return [float('inf') for c in completions]\n")
    short, boom, few, word, leave, endless = reward_functions(
        [f"{mine}:{name}" for name in ("short", "boom", "few", "word", "leave", "endless")])
    assert short(None, ["", "abc"]) == [1.0, 0.25] and short.__name__ == "short"
    assert reward_functions([f"{mine}:short"])[0] is short  # options checked, then the run: the file imported once
    from chatforge.errors import ChatforgeError

    for fn, message in ((boom, "boom: raised KeyError: 'answer'"), (few, "few: returned 1 values for 2 completions"),
                        (word, "word: returned 'good', not a finite number"), (leave, "leave: raised SystemExit: 3"),
                        (endless, "endless: returned inf, not a finite number")):
        with pytest.raises(ChatforgeError, match=re.escape(message)):
            fn(None, ["a", "b"])


@pytest.mark.parametrize("args, message", [
    (["--reward", "nope"], "a reward is one of exact, format, math, code or PATH.py:FUNCTION"),
    (["--reward", "missing.py:fn"], "no such file missing.py"),
    (["--task", "nowhere.jsonl"], "--task nowhere.jsonl: no such file"),
    (["--num-generations", "3"], "must be a multiple of --num-generations (3)"),
    (["--num-generations", "4", "--micro-batch-size", "6"], "(6) must be a multiple of --num-generations (4)"),
    (["--num-generations", "1"], "--num-generations"),
    (["--reward", "code"], "--reward code needs a task file whose records carry a 'test'"),
    (["--reward", "format", "--reward", "exact", "--reward", "format"], "--reward format is given twice"),
    (["--max-completion-length", "200"], "--max-completion-length 200: the longest prompt is"),
])
def test_bad_options_are_one_line(tmp_path, base_model_dir, args, message, capsys):
    assert message in refused(["rl", "--model", base_model_dir, "--out", tmp_path / "out", *args], capsys)
    assert not (tmp_path / "out").exists()


def test_bad_user_rewards_and_task_records(tmp_path, base_model_dir, capsys):
    """Refused before any folder is made: a reward file that fails to import, a reward without **kwargs (TRL
    passes the task's columns), a record whose 'test' is not a string, a model folder that is not there."""
    bad, narrow, wordy = tmp_path / "bad.py", tmp_path / "narrow.py", tmp_path / "wordy.py"
    bad.write_text("import not_a_module_anywhere\n")
    wordy.write_text("raise ValueError('\\n  set KEY first\\n  (see the docs)')\n")  # refused() checks: one line
    narrow.write_text("def short(prompts, completions):\n    return [0.0 for _ in completions]\n")
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"prompt": "p", "answer": "a", "test": ["x"]}) + "\n")
    for args, message in (
            (["--reward", f"{bad}:fn"], "failed to import (ModuleNotFoundError"),
            (["--reward", f"{wordy}:fn"], "failed to import (ValueError: set KEY first)"),
            (["--reward", f"{narrow}:short"], "must take (prompts, completions, **kwargs)"),
            (["--task", task], f"{task}:1: 'test' must be a string of Python asserts"),
            (["--model", tmp_path / "nowhere"], "model directory not found")):
        assert message in refused(["rl", "--model", base_model_dir, "--out", tmp_path / "out", *args], capsys)
        assert not (tmp_path / "out").exists()


def test_a_reward_that_never_returns_is_an_error(tmp_path, monkeypatch):
    from chatforge.errors import ChatforgeError
    from chatforge.train import rewards

    mine = tmp_path / "slow.py"
    mine.write_text("import time\ndef stuck(prompts, completions, **kw):\n    time.sleep(60)\n")
    stuck, = reward_functions([f"{mine}:stuck"])
    monkeypatch.setattr(rewards, "REWARD_SECONDS", 0.5)
    with pytest.raises(ChatforgeError, match="stuck: no answer within 0.5 s"):
        stuck(None, ["a"])


def test_overwrite_never_takes_a_reward_file_inside_out(tmp_path, base_model_dir, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "chatforge_output.json").write_text('{"kind": "rl", "written_by": "chatforge"}')  # an earlier rl run
    mine = out / "my_reward.py"
    mine.write_text("def short(prompts, completions, **kw):\n    return [0.0 for c in completions]\n")
    err = refused(["rl", "--model", base_model_dir, "--reward", f"{mine}:short", "--out", out, "--overwrite"], capsys)
    assert "would replace the input --reward" in err and mine.exists()


def test_task_file_split_and_export_keep_what_is_not_theirs(tmp_path):
    """A prompt repeated in a task file stays on one side of the split; exporting again replaces the three
    task files and nothing else in the folder."""
    task = tmp_path / "task.jsonl"
    records = [{"prompt": "a", "answer": "1"}] * 3 + [{"prompt": f"q{i}", "answer": str(i)} for i in range(7)]
    task.write_text("".join(json.dumps(r) + "\n" for r in records))
    run_cli("rl", "--task", task, "--export", tmp_path / "ex", "--eval-fraction", 0.2)
    read = lambda name: [json.loads(x)["prompt"] for x in (tmp_path / "ex" / name).read_text().splitlines()]  # noqa: E731
    assert read("heldout.jsonl") == ["a", "a", "a", "q0"] and "a" not in read("train.jsonl")
    (tmp_path / "ex" / "notes.txt").write_text("mine")
    run_cli("rl", "--task", task, "--export", tmp_path / "ex")
    assert (tmp_path / "ex" / "notes.txt").read_text() == "mine"
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("theirs")
    refusal = run_cli("rl", "--task", task, "--export", tmp_path / "theirs", check=False)
    assert refusal.returncode == 2 and f"--export {tmp_path / 'theirs'}: the folder exists and was not written by " \
        "chatforge; chatforge replaces only its own outputs: choose a new --export" in refusal.stderr, refusal.stderr


def test_multiple_choice_task_is_refused(tmp_path, base_model_dir, capsys):
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"context": "Sky?", "choices": [" blue", " red"], "gold": 0}) + "\n")
    err = refused(["rl", "--model", base_model_dir, "--out", tmp_path / "out", "--task", mc], capsys)
    assert "multiple-choice records; rl needs prompt/answer records" in err


def test_grpo_raises_heldout_accuracy_resumes_and_saves_plain(tmp_path, sign_habit):
    """RL that helps on prompts it never trained on: the exact reward favours the sampled answers with the right
    sign, and the habit it unlearns on the training sums is the same on the held-out ones: accuracy 0.01-0.06 ->
    0.14-0.27 over seeds (README, `chatforge rl`). Also: a user reward, KL logged, resume, a plain HF folder."""
    chat, _ = sign_habit
    mine = tmp_path / "length.py"
    mine.write_text("def brief(prompts, completions, **kw):\n"
                    "    return [1.0 if len(c[0]['content']) < 8 else 0.0 for c in completions]\n")
    out = tmp_path / "rl"
    args = ["rl", "--model", chat, "--out", out, "--operand-max", 20, "--reward", "exact", "--reward",
            f"{mine}:brief", "--max-completion-length", 4, "--save-every", 20, "--eval-every", 20,
            "--report-to", "none", "--learning-rate", 3e-4]
    first = run_cli(*args, "--max-steps", 40)
    assert "held-out accuracy before:" in first.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heldout_prompts"] == 88 and summary["eval_accuracy"] > summary["heldout_accuracy_before"] + 0.05
    assert {"reward", "reward_std", "kl", "completions/mean_length"} <= summary.keys()
    longer = run_cli(*args, "--max-steps", 42, "--resume", check=False)  # its schedule ended at 40
    assert longer.returncode == 2 and "--max-steps 42: the run being resumed has 40" in longer.stderr
    (out / "summary.json").unlink()  # as if killed after its last checkpoint, before the final save
    (out / "model.safetensors").unlink()
    resumed = run_cli(*args, "--max-steps", 40, "--resume")
    assert "resuming from" in resumed.stdout and "held-out accuracy" in resumed.stdout
    assert json.loads((out / "summary.json").read_text())["steps"] == 40 and not (out / "checkpoint-41").exists()
    assert f"{mine}:brief" in (out / "run_config.yaml").read_text()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out)
    assert "<|im_end|>" in AutoTokenizer.from_pretrained(out).chat_template
