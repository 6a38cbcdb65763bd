"""chatforge eval: scores equal lm-eval's stock `hf` model, local tasks and suites, outputs, bad input."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import refused, run_cli

pytest.importorskip("lm_eval")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def mc_records(n: int, seed: int = 0) -> list[dict]:
    """Questions with contexts long enough to be truncated by a 128-token window, and choices of
    different lengths (one-token ones included): every branch of the scorer."""
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "the", "sun", "rose", "over", "山", "水", "你好", "river", "bank", "while", "robots", "sing"]
    out = []
    for i in range(n):
        context = "Question: " + " ".join(rng.choice(words) for _ in range(rng.choice([3, 12, 40, 150]))) + "?\nAnswer:"
        choices = [" " + " ".join(rng.choice(words) for _ in range(rng.choice([1, 1, 2, 5]))) for _ in range(4)]
        out.append({"context": context, "choices": choices, "gold": i % 4})
    return out


def gen_records(n: int) -> list[dict]:
    return [{"prompt": f"Q: What is {i} plus {i}?\nA:", "answer": str(2 * i), "regex": r"(-?\d+)"} for i in range(n)]


def folder_digest(folder: str) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def instances(tmp_path_factory):
    """lm-eval requests of all three kinds, built by lm-eval itself from local task files."""
    from lm_eval.api.instance import Instance

    from chatforge.eval.tasks import read_task_file

    folder = tmp_path_factory.mktemp("tasks")
    mc = read_task_file(write_jsonl(folder / "mc.jsonl", mc_records(12)))
    reqs = [Instance("loglikelihood", r, (r["context"], c), i) for r in mc.records for i, c in enumerate(r["choices"])]
    reqs += [Instance("loglikelihood", {}, ("", " the cat"), 0)]  # an empty context: lm-eval's prefix token
    text = " ".join(["the river bank 你好 robots sing"] * 40)  # several rolling windows of 128 tokens
    rolling = [Instance("loglikelihood_rolling", {}, (text[:n],), 0) for n in (40, len(text))]
    gen = [Instance("generate_until", {}, (prompt, {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}), 0)
           for prompt in ("Hello", "What is AI?", "你好", "Tell me a joke about the river")]
    return reqs, rolling, gen


def test_scores_equal_lm_eval_hf_model(base_model_dir, instances):
    """The issue's contract: log-likelihoods within 1e-3 nats of lm-eval's `hf` model (fp32), the same
    greedy flags, so the same accuracy; rolling perplexity and greedy generations equal too."""
    from lm_eval.models.huggingface import HFLM

    from chatforge.eval.lm import ChatforgeLM

    reqs, rolling, gen = instances
    ours = ChatforgeLM(base_model_dir, dtype="fp32", batch_size=8)  # small batches: several forwards per call
    try:
        mine = (ours.loglikelihood(reqs), ours.loglikelihood_rolling(rolling), ours.generate_until(gen))
    finally:
        ours.close()
    hf = HFLM(pretrained=base_model_dir, device="cpu", batch_size=1, dtype="float32")
    theirs = (hf.loglikelihood(reqs), hf.loglikelihood_rolling(rolling), hf.generate_until(gen))
    assert len(mine[0]) == len(theirs[0]) == len(reqs)
    for (a, greedy_a), (b, greedy_b) in zip(mine[0], theirs[0]):
        assert abs(a - b) < 1e-3 and greedy_a == greedy_b
    assert mine[1] == pytest.approx(theirs[1], abs=1e-3)
    assert mine[2] == theirs[2]
    assert any(text.strip() for text in mine[2])


def test_scoring_memory_stays_bounded(base_model_dir):
    """A perplexity task over a large corpus (2.6 MB of text failed both ways): every scored position's
    log-probs span the vocabulary, so keeping them until the end held ~V x 4 bytes per token; and rolling
    windows that follow the same token share a one-token prefix, so packing all of them in one row made
    its attention quadratic in their number (a 62 GB allocation). So: at every forward, nothing of the
    earlier forwards is still alive, no row holds more than a window of suffix tokens, and the answers
    (duplicates and same-input requests with different last tokens included) equal scoring each alone."""
    import gc
    import weakref

    import torch

    from chatforge.eval.scoring import loglikelihoods
    from chatforge.modeling import load_model

    model = load_model(base_model_dir, dtype=torch.float32).eval()
    rng = random.Random(0)
    requests = [([rng.randrange(1, 500) for _ in range(rng.choice([1, 30, 90]))],
                 [rng.randrange(1, 500) for _ in range(rng.choice([1, 40, 100]))]) for _ in range(24)]
    requests += [([7], [rng.randrange(1, 500) for _ in range(100)]) for _ in range(12)]  # rolling windows after token 7
    requests += [requests[0], (requests[1][0], requests[1][1][:-1] + [499])]  # a duplicate; another last token
    alive: list[list[weakref.ref]] = []

    def call(fn, *args):
        gc.collect()
        assert not any(ref() is not None for refs in alive for ref in refs), "an earlier forward is still held"
        assert all(sum(map(len, group)) <= 128 for group in args[1]), "a row with more than a window of suffixes"
        results = fn(model, *args)
        alive.append([weakref.ref(logprobs) for group in results for logprobs, _ in group])
        return results

    with torch.inference_mode():
        batched = loglikelihoods(call, requests, max_length=128, batch_size=2)
        alone = [loglikelihoods(lambda fn, *a: fn(model, *a), [r], 128, 1)[0] for r in requests]
    assert len(alive) > 3
    for (a, greedy_a), (b, greedy_b) in zip(batched, alone):
        assert abs(a - b) < 1e-3 and greedy_a == greedy_b


def test_engine_call_failure_is_the_callers_alone(base_model_dir):
    from chatforge.engine import Engine, SamplingParams

    engine = Engine(base_model_dir)
    try:
        running = engine.submit(engine.encode("Hello"), SamplingParams(max_new_tokens=30, temperature=0.0))

        def broken(model):
            raise ValueError("this call fails")

        with pytest.raises(ValueError, match="this call fails"):
            engine.call(broken)
        assert engine.call(lambda model: model.config.model_type) == "gpt2"
        assert "".join(running) is not None and running.finish_reason in ("stop", "length")
    finally:
        engine.close()


def test_eval_cli_local_tasks_outputs_and_summary(base_model_dir, tmp_path):
    """Two models side by side; eval.json has their records; the chatforge run gets its summary updated,
    the foreign folder is left byte for byte as it was; suite scores are the centered accuracies."""
    model = tmp_path / "run"
    shutil.copytree(base_model_dir, model)
    foreign = tmp_path / "foreign"
    shutil.copytree(base_model_dir, foreign)
    (foreign / "chatforge_output.json").unlink()
    (foreign / "summary.json").unlink()
    before = folder_digest(foreign)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_jsonl(tasks / "mc.jsonl", mc_records(10))
    write_jsonl(tasks / "gen.jsonl", gen_records(4))
    out = tmp_path / "eval"
    proc = run_cli("eval", model, foreign, "--task-file", tasks, "--tasks", "builtin", "--limit", 8, "--out", out)
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("task"))
    assert header.split()[-2:] == ["run", "foreign"]
    assert any(line.startswith("suite: builtin") for line in lines)
    records = json.loads((out / "eval.json").read_text())["models"]
    assert [Path(r["model"]).name for r in records] == ["run", "foreign"]
    run = records[0]
    assert set(run["tasks"]) == {"local_mc", "local_gen", "builtin_mc_en", "builtin_mc_zh", "builtin_gen_en"}
    assert run["tasks"]["local_mc"]["n"] == 8 and 0 <= run["tasks"]["local_mc"]["metrics"]["acc"] <= 1
    # a pretrain run is a base model; a folder of unknown origin whose tokenizer has a chat template is
    # taken for a chat model
    assert run["chat_template"] is False and records[1]["chat_template"] is True
    from chatforge.eval.tasks import builtin_tasks, centered

    expected = [centered(run["tasks"][t.name]["metrics"][t.metric], t.random_baseline) for t in builtin_tasks()]
    assert run["suites"]["builtin"] == pytest.approx(sum(expected) / len(expected), abs=1e-4)
    summary = json.loads((model / "summary.json").read_text())
    assert summary["eval"]["tasks"]["local_mc"] == run["tasks"]["local_mc"] and "eval_loss" in summary
    assert folder_digest(foreign) == before
    # a second eval adds its tasks to the summary and replaces only the earlier eval.json
    (out / "notes.txt").write_text("mine")
    run_cli("eval", model, "--task-file", tasks / "gen.jsonl", "--limit", 2, "--out", out)
    summary = json.loads((model / "summary.json").read_text())
    assert summary["eval"]["tasks"]["local_gen"]["n"] == 2 and "local_mc" in summary["eval"]["tasks"]
    assert (out / "notes.txt").read_text() == "mine"
    assert [Path(r["model"]).name for r in json.loads((out / "eval.json").read_text())["models"]] == ["run"]


def test_humaneval_runs_generated_code_in_the_sandbox(never_stopping_model_dir, tmp_path):
    """A random model writes nonsense: the path (engine generation, sandboxed tests, pass@1) still runs."""
    out = tmp_path / "eval"
    proc = run_cli("eval", never_stopping_model_dir, "--tasks", "humaneval", "--limit", 2, "--out", out)
    assert "humaneval" in proc.stdout
    record = json.loads((out / "eval.json").read_text())["models"][0]
    assert record["tasks"]["humaneval"]["n"] == 2 and record["tasks"]["humaneval"]["metrics"]["pass@1"] == 0.0


BAD_TASK_FILES = [
    ('{"context": "a", "choices": [" b"], "gold": 0}', "mc.jsonl:1: 'choices' must be a list of at least two"),
    ('{"context": "a", "choices": [" b", " c"], "gold": 2}', "mc.jsonl:1: 'gold' must be an index into choices"),
    ('{"context": "a", "choices": [" b", " c"], "gold": 0}\n{"prompt": "x", "answer": "y"}',
     "mc.jsonl:2: a generate until record in a file of multiple choice records"),
    ('{"prompt": "x", "answer": "y", "regex": "("}', "mc.jsonl:1: 'regex' does not compile"),
    ('{"context": "a"', "mc.jsonl:1: malformed JSON"),
    ('{"question": "a"}', "mc.jsonl:1: a record needs context, choices, gold"),
    ("", "mc.jsonl: no records"),
]


@pytest.mark.parametrize("text,message", BAD_TASK_FILES)
def test_bad_task_files_name_file_and_line(base_model_dir, tmp_path, text, message):
    (tmp_path / "mc.jsonl").write_text(text + "\n", encoding="utf-8")
    proc = run_cli("eval", base_model_dir, "--task-file", tmp_path / "mc.jsonl", "--out", tmp_path / "e", check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("args,message", [
    (["/nonexistent/model"], "/nonexistent/model: model directory not found"),
    (["MODEL", "--tasks", "hellaswagg"], "--tasks hellaswagg: no such lm-eval task or chatforge suite; did you mean"),
    (["MODEL", "--tasks", "arc_easy", "--limit", 2], "task arc_easy: cannot load its dataset from the Hugging Face "
     "Hub: offline"),
    (["MODEL", "--task-file", "/nonexistent.jsonl"], "--task-file /nonexistent.jsonl: no such file or folder"),
    (["MODEL", "--limit", 0], "--limit must be >= 1, got 0"),
    (["MODEL", "--tasks", ",,"], "--tasks names no task"),
    (["MODEL", "--out", "USERDIR"], "holds files chatforge eval did not write"),
    (["MODEL", "--tasks", "builtin", "--num-fewshot", 40], "--num-fewshot 40: task builtin_gen_en has 30 records"),
    (["MODEL", "--device", "banana"], "--device banana: not a device name"),
    *([(["MODEL", "--device", "cuda"], "--device cuda: no CUDA GPU is available here")]
      if not torch.cuda.is_available() else []),
])
def test_bad_eval_input_is_one_line(base_model_dir, tmp_path, args, message, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    args = [base_model_dir if a == "MODEL" else user if a == "USERDIR" else a for a in args]
    argv = ["eval", *args, *([] if user in args else ["--out", tmp_path / "e"])]
    if "arc_easy" in args:  # offline from the first import of huggingface_hub on: its own process
        proc = run_cli(*argv, check=False)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        err = proc.stderr
    else:  # in this process: no interpreter start per case
        err = refused(argv, capsys)
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "e").exists() and [p.name for p in user.iterdir()] == ["notes.txt"]


def test_a_number_answer_matches_the_number_said():
    """A task file's answer 5 reaches lm-eval as 5.0 (the dataset loader types the column): scored as a number."""
    from chatforge.eval.tasks import exact_match

    assert exact_match({"answer": 5.0}, ["5"])["exact_match"] == 1.0
    assert exact_match({"answer": 2.5}, ["2.5."])["exact_match"] == 1.0
    assert exact_match({"answer": 5.0}, ["five"])["exact_match"] == 0.0
    assert exact_match({"answer": "5"}, ["5"])["exact_match"] == 1.0
