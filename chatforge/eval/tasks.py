"""What `chatforge eval` runs: lm-eval's named tasks, the user's own task files, and suites of both.

A local task is a JSONL file, one record per line, all of one kind (the first record decides):
- multiple choice: `{"context": "Question: ...\\nAnswer:", "choices": [" blue", " red"], "gold": 0}`:
  each choice is scored as a continuation of the context (acc, and acc_norm by bytes);
- generation: `{"prompt": "Q: 7 + 5?\\nA:", "answer": "12", "regex": "(-?\\\\d+)"}`: the model writes up
  to a newline; `regex` (optional; its first group, else the whole match) extracts the answer, which must
  equal `answer` ignoring case and surrounding spaces and full stops (exact_match).
Each file becomes an lm-eval task config that reads the file itself, so the same lm-eval code path runs
as for the named tasks, offline.

Suites (`--tasks NAME`):
- `builtin`: chatforge's own small offline suite (`builtin/`): a smoke test and a sanity score;
- `core`: a CORE-style base-model suite, scored as nanochat does: each task's accuracy centered on its
  random baseline, `(acc - random) / (1 - random)`, then averaged;
- `chat`: what a chat model is judged on: ARC-Challenge as chat questions, MMLU generative, GSM8K, HumanEval.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from chatforge.errors import ChatforgeError

BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_PREFIX = "builtin_"  # task names: builtin_mc_en, ...
LOCAL_PREFIX = "local_"  # a user's task file my.jsonl is task local_my: it never replaces a named task's results
HUMANEVAL = "humaneval"  # run by chatforge's sandbox, not lm-eval's in-process code_eval

# task -> (metric, random baseline): the metric each suite averages
CORE = {"hellaswag": ("acc_norm", 0.25), "arc_easy": ("acc", 0.25), "arc_challenge": ("acc_norm", 0.25),
        "piqa": ("acc", 0.5), "winogrande": ("acc", 0.5), "openbookqa": ("acc_norm", 0.25),
        "copa": ("acc", 0.5), "lambada_openai": ("acc", 0.0)}
CHAT = {"arc_challenge_chat": ("exact_match", 0.25), "mmlu_generative": ("exact_match", 0.25),
        "gsm8k": ("exact_match", 0.0), HUMANEVAL: ("pass@1", 0.0)}
SUITES = {"core": CORE, "chat": CHAT}
MC_FIELDS, GEN_FIELDS = ("context", "choices", "gold"), ("prompt", "answer")


@dataclass
class LocalTask:
    """One task file, read and checked."""

    name: str
    path: Path
    kind: str  # "multiple_choice" or "generate_until"
    records: list[dict]

    @property
    def random_baseline(self) -> float:
        if self.kind != "multiple_choice":
            return 0.0
        return sum(1 / len(r["choices"]) for r in self.records) / len(self.records)

    @property
    def metric(self) -> str:
        return "acc" if self.kind == "multiple_choice" else "exact_match"

    def lm_eval_config(self) -> dict:
        """An lm-eval task config (the form its YAML files load into) over this file."""
        common = {"task": self.name, "dataset_path": "json", "test_split": "train",
                  "dataset_kwargs": {"data_files": {"train": str(self.path)}}, "metadata": {"version": 1.0}}
        if self.kind == "multiple_choice":
            return {**common, "output_type": "multiple_choice", "doc_to_text": _field("context"),
                    "doc_to_choice": _field("choices"), "doc_to_target": _field("gold"),
                    "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                    for m in ("acc", "acc_norm")]}
        return {**common, "output_type": "generate_until", "doc_to_text": _field("prompt"),
                "doc_to_target": _field("answer"), "process_results": exact_match,
                "generation_kwargs": {"until": ["\n"], "max_gen_toks": 32, "do_sample": False},
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}


def _field(name: str):
    def get(doc: dict):
        return doc[name]
    return get


def normalize_answer(text: str) -> str:
    return text.strip().strip(".。").strip().casefold()


def extract_answer(text: str, regex: str | None) -> str:
    if not regex:
        return text
    found = re.search(regex, text)
    if found is None:
        return ""
    return (found.group(1) or "") if found.re.groups else found.group(0)  # group 1 may not take part


def exact_match(doc: dict, results: list[str]) -> dict:
    """lm-eval's process_results for a local generation task."""
    answer, want = normalize_answer(extract_answer(results[0], doc.get("regex"))), doc["answer"]
    if isinstance(want, (int, float)) and not isinstance(want, bool):  # the dataset loader reads a column of
        try:                                                             # numbers as floats: 5 arrives as 5.0
            return {"exact_match": float(float(answer) == float(want))}
        except (ValueError, OverflowError):
            return {"exact_match": 0.0}
    return {"exact_match": float(answer == normalize_answer(str(want)))}


def read_task_file(path: Path, prefix: str = "") -> LocalTask:
    """Read and check one JSONL task file; a bad record is an error naming the file and line."""
    from chatforge.text.sources import SourceStats, jsonl_records

    records, kind = [], None
    for record, where in jsonl_records(str(path), SourceStats(), strict=True):
        this = "multiple_choice" if "choices" in record else "generate_until" if "prompt" in record else None
        if this is None:
            raise ChatforgeError(f"{where}: a record needs {', '.join(MC_FIELDS)} (multiple choice) or "
                                 f"{', '.join(GEN_FIELDS)} (generation)")
        if kind is None:
            kind = this
        elif this != kind:
            raise ChatforgeError(f"{where}: a {this.replace('_', ' ')} record in a file of {kind.replace('_', ' ')} "
                                 "records; one kind per file")
        _check_record(record, kind, where)
        records.append(record)
    if not records:
        raise ChatforgeError(f"{path}: no records")
    name = prefix + re.sub(r"[^\w-]", "_", path.stem)
    return LocalTask(name, path.resolve(), kind, records)


def _check_record(record: dict, kind: str, where: str) -> None:
    try:  # what the datasets library reads back must be what was checked here
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ChatforgeError(f"{where}: holds a lone surrogate escape (such as \\ud800), which is not text") from None
    def need(key: str, ok, what: str) -> None:
        if key not in record:
            raise ChatforgeError(f"{where}: missing {key!r}")
        if not ok(record[key]):
            raise ChatforgeError(f"{where}: {key!r} must be {what}, got {record[key]!r:.80}")

    if kind == "multiple_choice":
        need("context", lambda v: isinstance(v, str), "a string")
        need("choices", lambda v: isinstance(v, list) and len(v) >= 2 and all(isinstance(c, str) and c for c in v),
             "a list of at least two non-empty strings")
        need("gold", lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(record["choices"]),
             f"an index into choices (0..{len(record['choices']) - 1})")
        return
    need("prompt", lambda v: isinstance(v, str) and v, "a non-empty string")
    need("answer", lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool) and str(v).strip(),
         "a non-empty string or number")
    if record.get("regex") is not None:
        need("regex", lambda v: isinstance(v, str), "a string")
        try:
            re.compile(record["regex"])
        except re.error as err:
            raise ChatforgeError(f"{where}: 'regex' does not compile ({err})") from None


def task_files(spec: str) -> list[Path]:
    """A --task-file: one .jsonl file, or a folder of them."""
    if not spec.strip():
        raise ChatforgeError("--task-file needs a path")
    path = Path(spec)
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise ChatforgeError(f"--task-file {spec}: the folder holds no .jsonl files")
        return files
    if not path.is_file():
        raise ChatforgeError(f"--task-file {spec}: no such file or folder")
    return [path]


def builtin_tasks() -> list[LocalTask]:
    return [read_task_file(p, prefix=BUILTIN_PREFIX) for p in sorted(BUILTIN_DIR.glob("*.jsonl"))]


def expand_suites(parts: list[str]) -> list[str]:
    """Task names with suites expanded, order kept, no repeats."""
    names: list[str] = []
    for part in parts:
        for name in SUITES.get(part, [part]):
            if name not in names:
                names.append(name)
    return names


def centered(value: float, baseline: float) -> float:
    return (value - baseline) / (1 - baseline) if baseline < 1 else 0.0
