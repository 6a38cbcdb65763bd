"""Read a run folder (chatforge's or any Hugging Face model folder) into a plain `Run` record.

Nothing here writes or loads a model: shapes come from config.json, the parameter count from the
safetensors headers, the numbers from summary.json / run_config.yaml / data/manifest.json, the curves
from the Trainer's trainer_state.json and, for what it lacks (tokens/s), the TensorBoard event files.
A file that is missing or unreadable is simply absent from the record.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from chatforge.modeling import cpu_name
from chatforge.outputs import owner_kind

# curve name -> (trainer_state.json log_history key, TensorBoard scalar tag)
CURVES = {
    "loss": ("loss", "train/loss"),
    "eval_loss": ("eval_loss", "eval/loss"),
    "learning_rate": ("learning_rate", "train/learning_rate"),
    "tokens_per_s": ("tokens_per_s", "train/tokens_per_s"),  # chatforge adds it to the logs only TensorBoard keeps
}
TENSORBOARD_DIRS = ("logs", "runs")  # chatforge's TENSORBOARD_LOGGING_DIR, the Trainer's default


@dataclass
class Run:
    """What the report knows about one run folder."""

    path: Path
    label: str                       # unique among the runs of one report: the folder name, or parent/name
    kind: str | None                 # chatforge_output.json's kind ("pretrain", "sft", ...); None: not chatforge's
    config: dict = field(default_factory=dict)      # config.json
    summary: dict = field(default_factory=dict)     # summary.json
    run_config: dict = field(default_factory=dict)  # run_config.yaml
    manifest: dict = field(default_factory=dict)    # the shards' manifest.json (pretrain)
    parameters: int | None = None
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # name -> [(step, value)]
    curve_sources: list[str] = field(default_factory=list)
    eval: dict | None = None         # the `chatforge eval` record
    chat_template: bool = False

    @property
    def tokens_per_step(self) -> float | None:
        """Training tokens per optimizer step: exact for pretrain, the mean for sft (conversations vary)."""
        steps, seen = self.summary.get("steps"), self.summary.get("tokens_seen")
        if _number(steps) and _number(seen) and steps > 0:
            return seen / steps
        batch = self.run_config.get("batch_tokens")
        return float(batch) if _number(batch) and batch > 0 else None


def read_run(path: str | Path, label: str) -> Run:
    folder = Path(path)
    run = Run(path=folder, label=label, kind=owner_kind(folder), config=_json(folder / "config.json"),
              summary=_json(folder / "summary.json"), run_config=_yaml(folder / "run_config.yaml"))
    run.manifest = _manifest(folder, run.run_config)
    run.parameters = count_parameters(folder, run.config) or _int(run.summary.get("parameters"))
    run.curves, run.curve_sources = read_curves(folder)
    run.eval = read_eval(folder, run.summary)
    tok_config = _json(folder / "tokenizer_config.json")
    run.chat_template = (folder / "chat_template.jinja").exists() or bool(tok_config.get("chat_template"))
    return run


def labels_for(paths: list[str]) -> list[str]:
    """Legend names: each folder's name, with its parent's where two runs share a name."""
    names = [Path(p).resolve().name or str(p) for p in paths]
    return [f"{Path(p).resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]


# ---------------------------------------------------------------- model shape and size


def shape(config: dict) -> dict:
    """Architecture and sizes from config.json, GPT-2 and Llama-style key names alike (missing: None)."""
    def first(*keys):
        return next((config[k] for k in keys if config.get(k) is not None), None)

    return {"arch": first("model_type"), "layers": first("n_layer", "num_hidden_layers"),
            "d_model": first("n_embd", "hidden_size", "d_model"), "heads": first("n_head", "num_attention_heads"),
            "kv_heads": first("num_key_value_heads"), "context": first("n_positions", "max_position_embeddings"),
            "vocab": first("vocab_size")}


def count_parameters(folder: Path, config: dict) -> int | None:
    """Parameters stored in the folder's model safetensors (headers only). A tied output matrix is
    counted once: transformers does not store it, and if a file does, it is skipped here."""
    from safetensors import safe_open

    index = _json(folder / "model.safetensors.index.json").get("weight_map")
    files = sorted({folder / f for f in index.values()}) if isinstance(index, dict) else [folder / "model.safetensors"]
    shapes: dict[str, list[int]] = {}
    try:
        for file in files:
            with safe_open(str(file), "pt") as handle:
                names = handle.keys()  # safe_open is not iterable itself
                shapes.update({k: handle.get_slice(k).get_shape() for k in names})
    except Exception:  # absent (a LoRA adapter), truncated or not a safetensors file (SafetensorError): unknown
        return None
    if config.get("tie_word_embeddings") and "lm_head.weight" in shapes:
        embeddings = [s for k, s in shapes.items() if k.endswith(("wte.weight", "embed_tokens.weight"))]
        if shapes["lm_head.weight"] in embeddings:
            del shapes["lm_head.weight"]
    return sum(math.prod(s) for s in shapes.values()) or None


def hardware(summary: dict) -> str:
    """The device the run recorded, else this machine's CPU, saying which."""
    for key in ("device", "hardware", "gpu"):
        if isinstance(summary.get(key), str) and summary[key]:
            return summary[key]
    gpu_note = "trained on a CUDA GPU (model not recorded); " if "peak_memory_gib" in summary else ""
    return f"{gpu_note}not recorded by the run; this report was made on: {cpu_name()}"


# ---------------------------------------------------------------- curves


def read_curves(folder: Path) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    """Curves by name, and the files they came from: trainer_state.json first (the folder's own, else the
    newest checkpoint's, which holds the whole history, resumes included), TensorBoard for the rest."""
    curves: dict[str, list[tuple[int, float]]] = {}
    sources = []
    state_file = _trainer_state_file(folder)
    if state_file is not None:
        history = _json(state_file).get("log_history")
        history = history if isinstance(history, list) else []  # a hand-edited file: no curves from it
        for name, (key, _) in CURVES.items():
            points = [(int(e["step"]), float(e[key])) for e in history if isinstance(e, dict)
                      and _number(e.get(key)) and _number(e.get("step"))]
            if points:
                curves[name] = points
        if curves:
            sources.append(str(state_file.relative_to(folder)))
    missing = [n for n in CURVES if n not in curves]
    if missing:
        found = _tensorboard_curves(folder, missing)
        if found:
            curves.update(found)
            sources.append("TensorBoard logs")
    return curves, sources


def _trainer_state_file(folder: Path) -> Path | None:
    if (folder / "trainer_state.json").is_file():
        return folder / "trainer_state.json"
    steps = [(int(p.name.split("-")[1]), p) for p in folder.glob("checkpoint-*")
             if p.name.split("-")[1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(steps)[1] / "trainer_state.json" if steps else None


def _tensorboard_curves(folder: Path, names: list[str]) -> dict[str, list[tuple[int, float]]]:
    """Scalars from the event files under logs/ or runs/; a later file (a resume) wins at a step."""
    files = sorted((f for d in TENSORBOARD_DIRS for f in (folder / d).rglob("events.out.tfevents.*")),
                   key=lambda f: f.name)  # the name carries the start time
    if not files:
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    by_step: dict[str, dict[int, float]] = {n: {} for n in names}
    for file in files:
        events = EventAccumulator(str(file), size_guidance={"scalars": 0})  # 0: keep every point
        events.Reload()  # a truncated or corrupt file reads as the events before the damage
        tags = set(events.Tags().get("scalars", []))
        for name in names:
            if CURVES[name][1] in tags:
                by_step[name].update({e.step: e.value for e in events.Scalars(CURVES[name][1])})
    return {n: sorted(points.items()) for n, points in by_step.items() if points}


# ---------------------------------------------------------------- eval results


def read_eval(folder: Path, summary: dict) -> dict | None:
    """The `chatforge eval` record: summary.json's "eval", else eval.json's record for this folder."""
    if _valid_eval(summary.get("eval")):
        return summary["eval"]
    models = _json(folder / "eval.json").get("models")
    for record in models if isinstance(models, list) else []:
        model = record.get("model") if isinstance(record, dict) else None
        # a relative path may be relative to where eval ran or to the folder itself
        if _valid_eval(record) and isinstance(model, str) and \
                folder.resolve() in (Path(model).resolve(), (folder / model).resolve()):
            return record
    return None


def _valid_eval(record) -> bool:
    return isinstance(record, dict) and isinstance(record.get("tasks"), dict)


def eval_rows(record: dict) -> list[dict]:
    """One row per task and numeric metric: task, metric, value, stderr (or None), n (or None)."""
    rows = []
    for task, result in record.get("tasks", {}).items():
        if not isinstance(result, dict) or not isinstance(result.get("metrics"), dict):
            continue
        stderr = result.get("stderr") if isinstance(result.get("stderr"), dict) else {}
        for metric, value in result["metrics"].items():
            if _number(value):
                rows.append({"task": str(task), "metric": str(metric), "value": float(value),
                             "stderr": float(stderr[metric]) if _number(stderr.get(metric)) else None,
                             "n": _int(result.get("n"))})
    return rows


def suite_scores(record: dict) -> dict[str, float]:
    suites = record.get("suites")
    return {str(k): float(v) for k, v in suites.items() if _number(v)} if isinstance(suites, dict) else {}


# ---------------------------------------------------------------- small readers


def _manifest(folder: Path, run_config: dict) -> dict:
    """The shards a pretrain run read: its own data/ folder, or a prepared --data folder."""
    candidates = [folder / "data" / "manifest.json"]
    data = run_config.get("data")
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], str):
        candidates.append(Path(data[0]) / "manifest.json")
    return next((m for m in map(_json, candidates) if m), {})


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _yaml(path: Path) -> dict:
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return value if isinstance(value, dict) else {}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(value) -> int | None:
    return int(value) if _number(value) else None
