"""`chatforge eval MODEL_DIR... --tasks ...`: scores on lm-eval tasks, local task files and suites.

Each model loads once into an Engine; lm-eval runs every task through it (`lm.py`), HumanEval through
chatforge's sandbox (`humaneval.py`). Results: a table (one column per model), `OUT/eval.json`, and
for a model folder chatforge wrote, the record merged into its summary.json under "eval".
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from chatforge.config import option
from chatforge.errors import ChatforgeError, check_hub_reachable, one_line, transformers_quiet
from chatforge.eval import tasks as T
from chatforge.modeling import check_model_folder

EVAL_JSON = "eval.json"
HUMANEVAL_MAX_TOKENS = 384
FEWSHOT_SEED = 1234  # lm-eval's default: the same few-shot examples as its own runs
CHAT_KINDS = ("sft", "dpo", "rl")  # chatforge outputs that are chat models


@dataclass
class EvalConfig:
    """`chatforge eval`: benchmark scores through lm-evaluation-harness, with chatforge's engine underneath."""

    models: list[str] = option([], "model folders: chatforge runs or any local Hugging Face causal LM",
                               positional=True, metavar="MODEL_DIR")
    tasks: list[str] = option([], "lm-eval task names or suites (builtin, core, chat), comma-separated or repeated "
                              "(default: builtin, unless --task-file is given)", metavar="TASKS")
    task_file: list[str] = option([], "your own task: a .jsonl file or a folder of them (format: README, Evaluate)",
                                  metavar="PATH")
    out: str = option("eval", "folder for eval.json (in an earlier chatforge eval output only eval.json is replaced)",
                      metavar="DIR")
    limit: int | None = option(None, "at most N examples per task, for quick runs", min=1, metavar="N")
    num_fewshot: int | None = option(None, "few-shot examples per prompt (default: each task's own)", min=0,
                                     metavar="N")
    batch_size: int = option(64, "scoring: prefixes per forward; generation: requests decoding at once", min=1,
                             max=256, metavar="N")
    chat_template: str = option("auto", "format prompts with the model's chat template; auto: for chat models "
                                "(a chatforge sft run, or another folder whose tokenizer has a template)", choices=("auto", "on", "off"))
    device: str | None = option(None, "cpu, cuda, cuda:1, ... (default: cuda when available)", metavar="DEVICE")
    dtype: str = option("auto", "weights' dtype; auto: as for generate and serve (bf16 on GPUs, on a CPU the "
                                 "faster one there)", choices=("auto", "bf16", "fp16", "fp32"))

    def validate(self) -> None:
        if not lm_eval_installed():
            raise ChatforgeError("chatforge eval needs lm-evaluation-harness: pip install 'chatforge[eval]'")
        if not self.models:
            raise ChatforgeError("name at least one MODEL_DIR")
        for model in self.models:
            check_model_folder(model)
        if len({os.path.realpath(m) for m in self.models}) < len(self.models):
            raise ChatforgeError("the same MODEL_DIR is named twice")
        if self.device is not None:
            check_device(self.device)


def check_device(device: str) -> None:
    """--device names a device torch knows and this machine has."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ChatforgeError(f"--device {device}: not a device name (cpu, cuda, cuda:1, ...)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ChatforgeError(f"--device {device}: no CUDA GPU is available here")
    if kind not in ("cpu", "cuda"):
        raise ChatforgeError(f"--device {device}: chatforge runs on cpu or cuda")


def lm_eval_installed() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


@dataclass
class Plan:
    """What to run: lm-eval tasks (names and local configs), HumanEval, and how suites are scored."""

    lm_eval: dict  # lm-eval's loaded tasks (TaskManager.load), empty when none
    local: dict[str, T.LocalTask]
    humaneval: bool
    suites: list[str]


def plan_tasks(cfg: EvalConfig) -> Plan:
    """Resolve --tasks and --task-file and load the tasks' data before any model loads or anything is
    written: unknown names, bad files and datasets out of reach are errors."""
    parts = [t.strip() for spec in cfg.tasks for t in spec.split(",") if t.strip()]
    if cfg.tasks and not parts:
        raise ChatforgeError("--tasks names no task")
    if not cfg.tasks and not cfg.task_file:
        parts = ["builtin"]
    names = T.expand_suites([p for p in parts if p != "builtin"])
    local = {t.name: t for t in (T.builtin_tasks() if "builtin" in parts else [])}
    seen: set[Path] = set()
    for spec in cfg.task_file:
        for path in T.task_files(spec):
            if path.resolve() in seen:
                raise ChatforgeError(f"--task-file {path}: given twice")
            seen.add(path.resolve())
            task = T.read_task_file(path, prefix=T.LOCAL_PREFIX)
            if task.name in local:
                raise ChatforgeError(f"--task-file {path}: a second task named {task.name!r}; rename one file")
            local[task.name] = task
    for task in local.values():
        if cfg.num_fewshot and cfg.num_fewshot >= len(task.records):
            raise ChatforgeError(f"--num-fewshot {cfg.num_fewshot}: task {task.name} has {len(task.records)} records; "
                                 "its few-shot examples come from the same file")
    humaneval = T.HUMANEVAL in names
    named = [n for n in names if n != T.HUMANEVAL]
    if named:
        known = _task_manager(True).all_tasks
        for name in named:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else "; `lm_eval ls tasks` lists them"
                raise ChatforgeError(f"--tasks {name}: no such lm-eval task or chatforge suite{hint}")
    wanted = named + [t.lm_eval_config() for t in local.values()]
    return Plan(load_lm_eval_tasks(wanted, cfg.num_fewshot) if wanted else {}, local, humaneval,
                [p for p in dict.fromkeys(parts) if p in T.SUITES or p == "builtin"])


def check_models(cfg: EvalConfig) -> None:
    """Every model's tokenizer loads (and has a chat template where one is asked for) before the first
    model is evaluated."""
    from transformers import AutoTokenizer

    for model in cfg.models:
        try:
            with transformers_quiet():
                tokenizer = AutoTokenizer.from_pretrained(model)
        except (OSError, ValueError) as err:
            raise ChatforgeError(f"{model}: cannot load its tokenizer ({one_line(err)})") from None
        if cfg.chat_template == "on" and not tokenizer.chat_template:
            raise ChatforgeError(f"{model}: --chat-template on, but its tokenizer has no chat template")


def check_out(cfg: EvalConfig) -> None:
    """--out: new, empty, or an earlier `chatforge eval` output (only its eval.json is replaced); never an
    input, nor inside a model folder chatforge did not write."""
    from chatforge.outputs import OWNER, check_not_inputs, owner_kind

    check_not_inputs(cfg.out, [("MODEL_DIR", m) for m in cfg.models] + [("--task-file", f) for f in cfg.task_file])
    out = Path(cfg.out).resolve()
    for model in cfg.models:
        if out.is_relative_to(Path(model).resolve()) and owner_kind(model) is None:
            raise ChatforgeError(f"--out {cfg.out}: inside {model}, a folder chatforge did not write")
    if out.exists() and not out.is_dir():
        raise ChatforgeError(f"--out {cfg.out}: exists and is not a folder")
    if out.is_dir() and any(p.name != OWNER for p in out.iterdir()) and owner_kind(out) != "eval":
        raise ChatforgeError(f"--out {cfg.out}: the folder exists and holds files chatforge eval did not write; "
                             "choose a new --out")


@functools.cache  # lm-eval indexes every task's YAML file (~10 s): once per process; called positionally,
def _task_manager(named: bool):  # as functools.cache keys f(True) and f(named=True) apart
    from lm_eval.tasks import TaskManager

    return TaskManager() if named else TaskManager(include_defaults=False)


def evaluate(cfg: EvalConfig, log=print) -> list[dict]:
    """Run the plan on every model; print the table; write eval.json (and summaries); return the records.
    Nothing is written before every model has been evaluated."""
    from chatforge.outputs import mark, owner_kind

    cfg.validate()
    check_out(cfg)
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # "Generating train split" bars for a few hundred records: noise before the table
    plan = plan_tasks(cfg)
    check_models(cfg)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    records = [evaluate_model(cfg, plan, model, log) for model in cfg.models]
    log(format_table(records))
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    if owner_kind(cfg.out) != "eval":
        mark(cfg.out, "eval")
    _write_json(Path(cfg.out) / EVAL_JSON, {"models": records})
    for record in records:
        merge_into_summary(record)
    log(f"results: {Path(cfg.out) / EVAL_JSON}")
    return records


def evaluate_model(cfg: EvalConfig, plan: Plan, model_dir: str, log=print) -> dict:
    from chatforge.engine import Engine
    from chatforge.eval.lm import ChatforgeLM

    started = time.time()
    log(f"evaluating {model_dir}")
    engine = Engine(model_dir, device=cfg.device, dtype=cfg.dtype, max_batch=min(cfg.batch_size, 64),
                    max_queue=max(64, cfg.batch_size))
    try:
        lm = ChatforgeLM(model_dir, batch_size=cfg.batch_size, engine=engine)
        chat = cfg.chat_template == "on" or (cfg.chat_template == "auto" and is_chat_model(model_dir, engine.tokenizer))
        record = {"model": os.path.abspath(model_dir), "tasks": {}, "suites": {}, "limit": cfg.limit,
                  "chat_template": chat}
        if plan.lm_eval:
            for task in plan.lm_eval["tasks"].values():  # every model sees the same few-shot examples
                task.set_fewshot_seed(seed=FEWSHOT_SEED)
            record["tasks"].update(run_lm_eval(lm, plan, cfg, chat))
        if plan.humaneval:
            record["tasks"][T.HUMANEVAL] = run_humaneval(engine, cfg.limit, log)
    finally:
        engine.close()
    record["suites"] = suite_scores(record["tasks"], plan)
    record["seconds"] = round(time.time() - started, 1)
    return record


def is_chat_model(model_dir: str, tokenizer) -> bool:
    """A chatforge chat run, or a folder chatforge did not write whose tokenizer has a chat template (a
    chatforge tokenizer always has one, base models' included)."""
    from chatforge.outputs import owner_kind

    kind = owner_kind(model_dir)  # a chat run whose template was removed by hand is scored as a base model
    return bool(tokenizer.chat_template) and (kind in CHAT_KINDS if kind is not None else True)


def load_lm_eval_tasks(tasks: list, num_fewshot: int | None) -> dict:
    """lm-eval's tasks, datasets loaded, set up as `simple_evaluate` sets them up."""
    manager = _task_manager(any(isinstance(t, str) for t in tasks))
    loaded: dict = {"tasks": {}, "groups": {}}
    for task in tasks:  # one at a time, so that a dataset that cannot load is named
        name = task if isinstance(task, str) else task["task"]
        if isinstance(task, str):  # lm-eval's own tasks: their datasets come from the Hub (or its cache)
            check_hub_reachable(f"task {name}", "datasets already in the Hugging Face cache load with HF_HUB_OFFLINE=1")
        try:
            one = manager.load([task])
        except Exception as err:  # noqa: BLE001 - datasets fails in many ways; all mean "cannot get the data"
            offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
            why = "offline (HF_HUB_OFFLINE=1) and not in the datasets cache" if offline else \
                f"{type(err).__name__}: {one_line(str(err))}"
            raise ChatforgeError(f"task {name}: cannot load its dataset from the Hugging Face Hub: {why}") from None
        for key in loaded:
            loaded[key].update(one[key])
    for task in loaded["tasks"].values():
        if num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
    return loaded


def run_lm_eval(lm, plan: Plan, cfg: EvalConfig, chat: bool) -> dict:
    """lm-eval's own evaluation loop (`evaluator.evaluate`: `simple_evaluate` would add a pip and git
    environment survey, printed to the terminal, to every call)."""
    from lm_eval.evaluator import evaluate as lm_eval_evaluate

    results = lm_eval_evaluate(lm=lm, task_dict=plan.lm_eval, limit=cfg.limit, bootstrap_iters=1000,
                               log_samples=False, apply_chat_template=chat, fewshot_as_multiturn=chat,
                               verbosity="ERROR")
    return task_results(results)


def task_results(results: dict) -> dict:
    """lm-eval's results -> {task: {metrics, stderr, n, kind}} (groups such as mmlu included)."""
    out = {}
    for task, values in results["results"].items():
        metrics, stderr = {}, {}
        for key, value in values.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric = key.split(",", 1)[0]
            if metric.endswith("_stderr"):
                stderr[metric[:-len("_stderr")]] = value
            else:
                metrics[metric] = value
        if not metrics:
            continue
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        kind = results.get("configs", {}).get(task, {}).get("output_type", "group")
        out[task] = {"metrics": metrics, "stderr": stderr, "n": n, "kind": kind}
    return out


def run_humaneval(engine, limit: int | None, log=print) -> dict:
    """Completion-style: the model continues each problem's prompt (no chat template), greedy, and the
    program runs against the problem's tests in the sandbox."""
    from chatforge.engine import SamplingParams
    from chatforge.eval import humaneval
    from chatforge.eval.lm import generate_all

    problems = humaneval.load_problems(limit)
    jobs, fits = [], []
    for problem in problems:
        prompt = engine.encode(problem["prompt"])
        budget = min(HUMANEVAL_MAX_TOKENS, engine.context_length - len(prompt))
        fits.append(budget >= 1)  # a prompt the model's window cannot hold counts as failed
        if budget >= 1:
            jobs.append((prompt, SamplingParams(max_new_tokens=budget, temperature=0.0, stop=humaneval.STOP)))
    if not jobs:
        raise ChatforgeError(f"humaneval: no prompt fits this model's context window ({engine.context_length} tokens)")
    if len(jobs) < len(problems):
        log(f"humaneval: {len(problems) - len(jobs)} of {len(problems)} prompts do not fit this model's context "
            f"window ({engine.context_length} tokens): counted as failed")
    texts = iter(generate_all(engine, jobs))
    completions = [next(texts) if fit else "" for fit in fits]
    passed = [ok for ok, _ in humaneval.evaluate(problems, completions)]
    value = humaneval.pass_at_1(passed)
    err = humaneval.pass_at_1_stderr(passed)
    return {"metrics": {"pass@1": value}, "stderr": {} if math.isnan(err) else {"pass@1": err}, "n": len(problems),
            "kind": "generate_until", "too_long": fits.count(False)}


def suite_scores(results: dict, plan: Plan) -> dict:
    """Each suite's average centered score over the tasks that ran (nanochat's CORE-style metric)."""
    out = {}
    for suite in plan.suites:
        table = {name: (t.metric, t.random_baseline) for name, t in plan.local.items()
                 if name.startswith(T.BUILTIN_PREFIX)} if suite == "builtin" else T.SUITES[suite]
        scores = [T.centered(results[name]["metrics"][metric], baseline) for name, (metric, baseline) in table.items()
                  if name in results and metric in results[name]["metrics"]]
        if scores:
            out[suite] = round(sum(scores) / len(scores), 4)
    return out


def format_table(records: list[dict]) -> str:
    """task | metric | n | one column per model (value ± stderr); suites last."""
    names = [Path(r["model"]).name for r in records]
    rows = []
    for task in dict.fromkeys(t for r in records for t in r["tasks"]):
        for metric in dict.fromkeys(m for r in records if task in r["tasks"] for m in r["tasks"][task]["metrics"]):
            cells = []
            n = ""
            for r in records:
                entry = r["tasks"].get(task)
                if not entry or metric not in entry["metrics"]:
                    cells.append("-")
                    continue
                n = str(entry["n"] or "")
                err = entry["stderr"].get(metric)
                cells.append(f"{entry['metrics'][metric]:.4f}" + (f" ± {err:.4f}" if err else ""))
            rows.append([task, metric, n, *cells])
    for suite in dict.fromkeys(s for r in records for s in r["suites"]):
        rows.append([f"suite: {suite}", "centered", "", *[f"{r['suites'][suite]:.4f}" if suite in r["suites"]
                                                          else "-" for r in records]])
    header = ["task", "metric", "n", *names]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def merge_into_summary(record: dict) -> None:
    """A model folder chatforge wrote gets the record in its summary.json (tasks merged with earlier
    evals); any other folder is never written to."""
    from chatforge.outputs import owner_kind
    from chatforge.train.common import SUMMARY

    folder = Path(record["model"])
    path = folder / SUMMARY
    if owner_kind(folder) is None or not path.exists():
        return
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = None
    if not isinstance(summary, dict):  # damaged by hand: eval.json holds the scores, the summary is left alone
        print(f"chatforge: note: {path} is not a JSON object; the scores are only in eval.json", file=sys.stderr)
        return
    earlier = summary.get("eval") if isinstance(summary.get("eval"), dict) else {}
    merged = {**record, "tasks": {**earlier.get("tasks", {}), **record["tasks"]},
              "suites": {**earlier.get("suites", {}), **record["suites"]}}
    summary["eval"] = {k: v for k, v in merged.items() if k != "model"}
    _write_json(path, summary)


def _write_json(path: Path, data) -> None:
    from chatforge.outputs import write_atomic

    write_atomic(path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
