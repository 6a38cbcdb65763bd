"""The Hugging Face model card (README.md) of a run: YAML metadata the Hub reads (library, pipeline,
tags, language, a `model-index` with the eval results) and a body that says what the model is, how it
was trained, how to load it and how it scored.

Where it goes: into the model folder only when chatforge wrote that folder and its README.md is absent
or a card chatforge wrote (the marker line below); otherwise next to the report, and the model folder is
left alone.
"""

from __future__ import annotations

import json
from pathlib import Path

from chatforge.report.markdown import eval_table, facts_table
from chatforge.report.runs import Run, eval_rows, shape

MARKER = "<!-- written by chatforge report: delete this line to keep chatforge from replacing this card -->"
MARKER_PREFIX = "<!-- written by chatforge report"


def is_ours(readme: Path) -> bool:
    """Whether `readme` is a card chatforge wrote (its marker line is still there)."""
    try:
        text = readme.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(line.startswith(MARKER_PREFIX) for line in text.splitlines())


def destination(run: Run, out: Path) -> Path:
    """The model folder's README.md when chatforge wrote the folder and the card there is absent or ours;
    else OUT/<run label>/README.md."""
    readme = run.path / "README.md"
    if run.kind is not None and (not (readme.exists() or readme.is_symlink()) or is_ours(readme)):
        return readme
    return out / run.label.replace("/", "--") / "README.md"


def languages(run: Run) -> list[str]:
    """Best effort: the languages of the built-in demo corpus the run trained on (`demo:zh` -> zh)."""
    data = run.run_config.get("data")
    found = [spec.partition(":")[2] for spec in data if isinstance(spec, str) and spec.startswith("demo:")] \
        if isinstance(data, list) else []
    return list(dict.fromkeys(lang for lang in found if lang))


def card_data(run: Run, name: str):
    """The card's YAML metadata (huggingface_hub's ModelCardData), `model-index` included."""
    # imported when used: the CLI starts without it
    from huggingface_hub import EvalResult, ModelCardData

    arch = shape(run.config)["arch"]
    results = [EvalResult(task_type="text-generation", dataset_type=r["task"], dataset_name=r["task"],
                          metric_type=r["metric"], metric_value=r["value"])
               for r in eval_rows(run.eval or {})]
    return ModelCardData(model_name=name, library_name="transformers", pipeline_tag="text-generation",
                         tags=["chatforge", *([arch] if arch else [])], language=languages(run) or None,
                         eval_results=results or None)


def model_card(run: Run):
    """The whole card (huggingface_hub's ModelCard): metadata and body."""
    from huggingface_hub import ModelCard

    name = run.path.resolve().name
    params = f"{run.parameters / 1e6:.2f}M-parameter " if run.parameters else ""
    arch = shape(run.config)["arch"] or "causal"
    base = run.run_config.get("model")
    origin = {"pretrain": "pretrained from scratch",
              "sft": f"fine-tuned for chat from {Path(str(base)).name}" if base else "fine-tuned for chat",
              }.get(run.kind or "", "trained")
    chat = run.chat_template and run.kind != "pretrain"
    evals = eval_table(run.eval) if run.eval else ""
    body = "\n".join([
        MARKER,
        "",
        f"# {name}",
        "",
        (f"A {params}{arch} language model {origin} with chatforge, on the Hugging Face stack "
         "(transformers `Trainer`, a stock transformers model class: it loads without chatforge)."),
        "",
        "## How to use it",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"path = {json.dumps(name, ensure_ascii=False)}  # this folder, or its repo id on the Hub",
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        "model = AutoModelForCausalLM.from_pretrained(path)",
        *(['messages = [{"role": "user", "content": "Hello!"}]',
           ("ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\","
            " return_dict=True)"),
           "out = model.generate(**ids, max_new_tokens=64, do_sample=False)",
           "print(tokenizer.decode(out[0][ids[\"input_ids\"].shape[1]:], skip_special_tokens=True))"] if chat else
          ['ids = tokenizer("Once upon a time", return_tensors="pt")',
           "out = model.generate(**ids, max_new_tokens=64, do_sample=False)",
           "print(tokenizer.decode(out[0], skip_special_tokens=True))"]),
        "```",
        "",
        "## Training",
        "",
        facts_table([run], local=False),  # a card is meant for the Hub: no paths of this machine
        "",
        "## Evaluation",
        "",
        evals or "Not evaluated yet: run `chatforge eval` on this folder, then `chatforge report` again.",
        "",
        "## Limitations",
        "",
        ("It makes mistakes and can state falsehoods confidently, more so the smaller it is and the less data it "
         "saw (see Training): check what it says before relying on it."),
        "",
    ])
    return ModelCard(f"---\n{card_data(run, name).to_yaml()}\n---\n\n{body}")
