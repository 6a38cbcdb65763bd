"""Markdown pieces shared by report.md and the model card: the facts about a run as table rows, the
eval results table, and cell escaping (model output may hold `|`, newlines or `<|im_end|>`)."""

from __future__ import annotations

import html
from pathlib import Path

from chatforge.report.runs import Run, eval_rows, hardware, shape, suite_scores

MISSING = "–"


def cell(text) -> str:
    """`text` shown as it is inside a Markdown table cell: no raw HTML, no column breaks, no code spans or
    emphasis, one line (blank lines dropped)."""
    text = html.escape(str(text).replace("\\", "\\\\"), quote=False)
    for char in "|`*_[]":
        text = text.replace(char, "\\" + char)
    return "<br>".join(line.strip() for line in text.splitlines() if line.strip())


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def number(value, digits: int = 4) -> str:
    """A readable number: thousands separators for integers, `digits` significant digits otherwise."""
    if value is None or isinstance(value, bool):
        return MISSING
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def facts(run: Run, local: bool = True) -> list[tuple[str, str]]:
    """(what, value) rows describing one run: kind, model shape and size, data, hardware, time, results.
    `local=False` (a card meant for the Hub): folders by name only, not their path on this machine."""
    s, rc, dims = run.summary, run.run_config, shape(run.config)
    base = rc.get("model") or rc.get("init_from")
    heads = number(dims["heads"]) + (f" ({dims['kv_heads']} key/value)" if dims["kv_heads"] not in (None, dims["heads"])
                                     else "")
    data = rc.get("data")
    corpus = run.manifest.get("train", {}) if isinstance(run.manifest.get("train"), dict) else {}
    counts = [run.manifest[split].get("documents") for split in ("train", "val")
              if isinstance(run.manifest.get(split), dict)]
    documents = sum(c for c in counts if isinstance(c, int) and not isinstance(c, bool))  # a hand-edited "5" is not
    seconds = s.get("train_seconds")
    memory = ((f"{s['peak_memory_gib']} GiB (GPU)" if "peak_memory_gib" in s else "")
              or (f"{s['peak_rss_gib']} GiB (process RSS)" if "peak_rss_gib" in s else MISSING))
    rows = [
        ("kind", run.kind or "unknown (not written by chatforge)"),
        ("folder", str(run.path.resolve()) if local else MISSING),
        ("fine-tuned from", (str(base) if local else Path(str(base)).name) if base else MISSING),
        ("architecture", " / ".join(str(a) for a in [dims["arch"], *(run.config.get("architectures") or [])[:1]] if a)
         or MISSING),
        ("layers", number(dims["layers"])),
        ("d_model", number(dims["d_model"])),
        ("attention heads", heads),
        ("context (tokens)", number(dims["context"])),
        ("vocabulary", number(dims["vocab"])),
        ("parameters", f"{run.parameters:,} ({run.parameters / 1e6:.2f}M)" if run.parameters else MISSING),
        ("data sources", ", ".join(map(str, data)) if isinstance(data, list) and data else MISSING),
        ("corpus", f"{number(corpus.get('tokens'))} training tokens, {number(documents)} documents"
         if corpus else MISSING),
        ("conversations", number(s.get("train_conversations"))),
        ("training tokens seen", number(s.get("tokens_seen"))),
        ("optimizer steps", number(s.get("steps"))),
        ("wall time", f"{seconds:,.1f} s ({seconds / 60:.1f} min)" if isinstance(seconds, (int, float)) else MISSING),
        ("tokens/s (mean)", number(s.get("tokens_per_s"))),
        ("MFU", number(s.get("mfu"))),
        ("hardware", hardware(s)),
        ("peak memory", memory),
        ("final training loss", number(s.get("loss"))),
        ("validation loss", number(s.get("eval_loss"))),
        ("validation bits per byte", number(s.get("eval_bpb"))),
        ("validation perplexity", number(s.get("eval_ppl"))),
        ("held-out preference accuracy (dpo)", number(s.get("eval_rewards/accuracies"))),
        ("held-out accuracy before rl", number(s.get("heldout_accuracy_before"))),
        ("held-out accuracy after rl", number(s.get("eval_accuracy"))),
        ("mean reward, last logged steps (rl)", number(s.get("reward"))),
    ]
    return rows


def facts_table(runs: list[Run], local: bool = True) -> str:
    """Rows: the facts at least one run has; columns: the runs."""
    per_run = [facts(run, local) for run in runs]
    rows = [[what, *(values[i][1] for values in per_run)] for i, (what, _) in enumerate(per_run[0])]
    names = [run.label if local else run.path.resolve().name for run in runs]
    return table(["", *names], [row for row in rows if any(v != MISSING for v in row[1:])])


def eval_table(record: dict) -> str:
    """Task, metric, value ± stderr, n; then the suites' scores. Empty when nothing was evaluated."""
    rows = [[r["task"], r["metric"], number(r["value"]) + (f" ± {number(r['stderr'], 2)}" if r["stderr"] is not None
                                                           else ""), number(r["n"])] for r in eval_rows(record)]
    parts = [table(["task", "metric", "value ± stderr", "n"], rows)] if rows else []
    suites = suite_scores(record)
    if suites:
        parts.append(table(["suite", "score"], [[name, number(score)] for name, score in suites.items()]))
    limit = record.get("limit")
    if parts and isinstance(limit, int) and not isinstance(limit, bool):
        parts.append(f"At most {limit} examples per task.")
    return "\n\n".join(parts)
