"""`chatforge report`: one Markdown report over one or more runs (tables, curves, eval results, sample
answers) and a Hugging Face model card per run.

What is written and where, following the project's rule that chatforge never touches what it did not
write (chatforge/outputs.py):
- OUT/report.md and its PNGs. A file in OUT is replaced only when the report.md already there is one
  `chatforge report` wrote and its first line lists that file; anything else there is refused.
- README.md, the model card: into the run folder when chatforge wrote that folder and the README.md
  there is absent or a card it wrote (marker line), else OUT/<run>/README.md. A folder chatforge did
  not write is only ever read.
Every file is written to a temporary name in its folder and renamed into place.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from chatforge.config import check_fields, option
from chatforge.errors import ChatforgeError, one_line
from chatforge.outputs import owner_kind, write_atomic
from chatforge.report import card, plots
from chatforge.report.markdown import cell, eval_table, facts_table, table
from chatforge.report.runs import Run, labels_for, read_run

REPORT = "report.md"
REPORT_MARKER = "<!-- written by chatforge report "  # first line of report.md, then {"files": [...]} -->
MODEL_FILES = ("config.json", "summary.json", "trainer_state.json", "model.safetensors")
# greedy answers are deterministic: the same prompts make reports comparable across runs
SAMPLE_PROMPTS = [
    "Hello!", "你好", "What is AI?", "Tell me a joke.", "什么是人工智能？", "Do you like books?",
    "What can you do?", "给我讲个笑话", "How are you today?", "你喜欢什么书？", "What is your name?",
    "Who are you?", "What is the capital of France?", "你叫什么名字？", "Can you help me?", "What is 2 + 2?",
    "今天天气怎么样？", "Tell me about the moon.", "Thank you!", "再见",
]
SAMPLE_TOKENS = 48


@dataclass
class ReportConfig:
    """`chatforge report`: a report (tables, curves, evals, samples) and model cards for runs."""

    runs: list[str] = option([], "run folders written by chatforge pretrain/sft (or any HF model folder)",
                             positional=True, metavar="RUN_DIR")
    out: str | None = option(None, "where report.md and the plots go (default: the first run folder when "
                                    "chatforge wrote it, else ./report)", metavar="DIR")
    samples: int = option(3, "greedy sample answers per chat model in the report (0: none)", min=0,
                          max=len(SAMPLE_PROMPTS), metavar="N")

    def validate(self) -> None:
        if not self.runs:
            raise ChatforgeError("report needs at least one RUN_DIR (a run or Hugging Face model folder)")
        seen = set()
        for run in self.runs:
            path = Path(run)
            if not path.is_dir():
                raise ChatforgeError(f"{run}: no such folder" if not path.exists() else f"{run}: not a folder")
            if not any((path / f).exists() for f in MODEL_FILES) and not any(path.glob("checkpoint-*")):
                hint = "; its runs are base/ and chat/" if owner_kind(path) == "quickstart" else ""
                raise ChatforgeError(f"{run}: not a run or model folder (no config.json, summary.json or "
                                     f"checkpoint-*){hint}")
            if path.resolve() in seen:
                raise ChatforgeError(f"{run}: given twice")
            seen.add(path.resolve())


def write_report(cfg: ReportConfig, log=print) -> dict:
    """Write OUT/report.md, its PNGs and a model card per run; returns the paths written:
    {"out": dir, "report": report.md, "plots": [png, ...], "cards": {run label: README.md}}."""
    check_fields(cfg)
    cfg.validate()
    runs = [read_run(path, label) for path, label in zip(cfg.runs, labels_for(cfg.runs))]
    out = Path(cfg.out) if cfg.out else runs[0].path if runs[0].kind else Path("report")
    check_out(out, runs)
    pngs = plots.wanted(runs)
    cards = {run.label: card.destination(run, out) for run in runs}
    previous = previous_files(out)
    check_replaceable(out, [REPORT, *pngs], previous, cards.values())

    samples = {run.label: sample_answers(run, cfg.samples, log) for run in runs if wants_samples(run, cfg.samples)}
    out.mkdir(parents=True, exist_ok=True)
    written = {"out": str(out), "report": str(out / REPORT), "plots": [], "cards": {}}
    for name in pngs:
        write_atomic(out / name, plots.render(runs, name))
        written["plots"].append(str(out / name))
    for run in runs:
        path = cards[run.label]
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, str(card.model_card(run)).encode("utf-8"))
        written["cards"][run.label] = str(path)
    ours = [REPORT, *pngs, *(os.path.relpath(p, out) for p in cards.values() if _inside(p, out))]
    text = report_markdown(runs, out, pngs, cards, samples)
    write_atomic(out / REPORT, (REPORT_MARKER + _files_json(ours) + " -->\n" + text).encode("utf-8"))
    for stale in sorted(set(previous) - set(ours)):  # plots the previous report drew and this one did not
        if stale.endswith(".png") and "/" not in stale:
            (out / stale).unlink(missing_ok=True)
    log(f"report: {out / REPORT} ({len(pngs)} plot(s)); model card(s): {', '.join(map(str, cards.values()))}")
    return written


# ---------------------------------------------------------------- what may be written


def check_out(out: Path, runs: list[Run]) -> None:
    """OUT is a folder (new or not: files are added to it, it is never emptied) and neither is nor is
    inside a run folder chatforge did not write (such a folder is only read)."""
    if out.exists() and not out.is_dir():
        raise ChatforgeError(f"--out {out}: exists and is not a folder")
    target = out.resolve()
    for run in runs:
        if run.kind is None and (target == run.path.resolve() or run.path.resolve() in target.parents):
            raise ChatforgeError(f"--out {out}: is or is inside {run.path}, a folder chatforge did not write; "
                                 "choose another --out")


def previous_files(out: Path) -> list[str] | None:
    """The files the report.md in `out` says it wrote; [] without a report.md; None if the report.md
    there is not one `chatforge report` wrote."""
    try:
        with open(out / REPORT, encoding="utf-8", errors="replace") as handle:
            first = handle.readline()
    except FileNotFoundError:
        return []
    except OSError as err:
        raise ChatforgeError(f"{out / REPORT}: cannot read ({err.strerror})") from None
    if not first.startswith(REPORT_MARKER):
        return None
    try:
        files = json.loads(first[len(REPORT_MARKER):].rsplit("-->", 1)[0]).get("files")
    except (ValueError, AttributeError):
        return []
    return [f for f in files if isinstance(f, str)] if isinstance(files, list) else []


def check_replaceable(out: Path, names: list[str], previous: list[str] | None, cards) -> None:
    """Refuse, before any work, to replace a file in OUT that a previous report did not write, or a
    README.md that is not a card chatforge wrote."""
    if previous is None:
        raise ChatforgeError(f"--out {out}: holds a {REPORT} that chatforge report did not write; "
                             "choose another --out")
    for name in names:
        if ((out / name).exists() or (out / name).is_symlink()) and name not in previous:
            raise ChatforgeError(f"--out {out}: {name} exists and was not written by chatforge report; "
                                 "choose another --out")
    for path in cards:
        if (path.exists() or path.is_symlink()) and not card.is_ours(path):
            raise ChatforgeError(f"{path}: exists and is not a model card chatforge wrote; "
                                 "move it away or choose another --out")


def _inside(path: Path, folder: Path) -> bool:
    return folder.resolve() in path.resolve().parents


def _files_json(files: list[str]) -> str:
    # "-->" inside a name must not end the HTML comment early; \u003e is the same character in JSON
    return json.dumps({"files": files}, ensure_ascii=False).replace(">", "\\u003e")


# ---------------------------------------------------------------- samples


def wants_samples(run: Run, n: int) -> bool:
    """Chat models only: a chat template and not a base model (chatforge's pretrain runs carry the
    template too, untrained)."""
    return n > 0 and run.chat_template and run.kind != "pretrain" and bool(run.config)


def sample_answers(run: Run, n: int, log) -> list[tuple[str, str]]:
    """(prompt, greedy answer) for the first `n` fixed prompts; a model that fails to load or generate
    gives one row saying why instead of ending the report."""
    from chatforge.engine import Engine, SamplingParams

    log(f"sampling {n} answer(s) from {run.path}")
    params = SamplingParams(max_new_tokens=SAMPLE_TOKENS, temperature=0.0)
    try:
        engine = Engine(str(run.path))
    except (ChatforgeError, OSError, ValueError, RuntimeError) as err:
        return [("(could not load the model)", one_line(err))]
    try:
        return [(q, engine.complete(engine.chat_prompt([{"role": "user", "content": q}]), params).text)
                for q in SAMPLE_PROMPTS[:n]]
    except (ChatforgeError, ValueError, RuntimeError) as err:
        return [("(generation failed)", one_line(err))]
    finally:
        engine.close()


# ---------------------------------------------------------------- report.md


def report_markdown(runs: list[Run], out: Path, pngs: list[str], cards: dict, samples: dict) -> str:
    def link(path: Path) -> str:  # relative to report.md when it can be; <...> allows spaces
        return f"<{os.path.relpath(path, out)}>" if _inside(path, out) else f"<{path.resolve()}>"

    parts = [f"# Training report: {', '.join(cell(run.label) for run in runs)}",
             f"Made by `chatforge report` on {datetime.now().strftime('%Y-%m-%d %H:%M')}.",
             "## Runs", facts_table(runs), "## Curves"]
    if pngs:
        axis = plots.x_axis([run for run in runs if run.curves])
        parts.append("x axis: " + ("training tokens (optimizer step × tokens per step; sft: the mean per step)."
                                   if axis == "tokens" else "optimizer step (tokens per step unknown for a run)."))
        parts += [f"![{plots.title(name)}](<{name}>)" for name in pngs]
    if "tokens_per_s.png" not in pngs:
        parts.append("No tokens/s curve: chatforge logs it to TensorBoard (train with `--report-to tensorboard`).")
    sources = [f"- {cell(run.label)}: {cell(', '.join(run.curve_sources)) or 'no training logs found'}"
               for run in runs]
    parts.append("Curves read from:\n" + "\n".join(sources))

    parts.append("## Evaluation")
    for run in runs:
        parts += [f"### {cell(run.label)}", (eval_table(run.eval) if run.eval else "") or
                  "Not evaluated: run `chatforge eval` on it, then `chatforge report` again."]
    if samples:
        parts += ["## Sample answers", f"Greedy decoding, at most {SAMPLE_TOKENS} new tokens."]
        for label, rows in samples.items():
            answers = [[q, a if a.strip() else "(empty)"] for q, a in rows]
            parts += [f"### {cell(label)}", table(["prompt", "answer"], answers)]
    parts += ["## Model cards", "\n".join(f"- {cell(label)}: [{cell(path.name)}]({link(path)})"
                                          for label, path in cards.items())]
    return "\n\n".join(parts) + "\n"
