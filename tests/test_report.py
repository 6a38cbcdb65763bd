"""`chatforge report`: report.md, plots and model cards from real run folders (copies of the session's
tiny pretrain run, so the shared fixture is never written to)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from chatforge.config import build
from chatforge.errors import ChatforgeError
from chatforge.report import REPORT_MARKER, ReportConfig, write_report
from chatforge.report.card import MARKER
from chatforge.report.runs import read_run

PNG = b"\x89PNG\r\n\x1a\n"
EVAL = {"model": "", "limit": 100, "seconds": 12.3, "suites": {"core": 0.12},
        "tasks": {"arc_easy": {"metrics": {"acc": 0.41, "acc_norm": 0.4}, "stderr": {"acc": 0.02, "acc_norm": 0.02},
                               "n": 100, "kind": "multiple_choice"},
                  "hellaswag": {"metrics": {"acc": 0.27}, "stderr": {}, "n": 50, "kind": "multiple_choice"}}}
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja")


def copy_run(src: str, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("optimizer.pt"))
    return dest


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def report(*runs, **kw) -> dict:
    return write_report(ReportConfig(runs=[str(r) for r in runs], samples=kw.pop("samples", 0), **kw),
                        log=lambda *_: None)


def test_one_run_default_out_is_the_run_folder(base_model_dir, tmp_path, monkeypatch):
    run = copy_run(base_model_dir, tmp_path / "base")
    written = report(run)
    assert Path(written["out"]) == run
    text = (run / "report.md").read_text(encoding="utf-8")
    assert text.startswith(REPORT_MARKER)
    assert {Path(p).name for p in written["plots"]} == {"train_loss.png", "val_loss.png", "learning_rate.png"}
    for png in written["plots"]:
        assert Path(png).read_bytes().startswith(PNG)
        assert f"(<{Path(png).name}>)" in text  # linked relative to report.md
    summary = json.loads((run / "summary.json").read_text())
    assert f"{summary['parameters']:,}" in text  # counted from the safetensors header, tied embeddings once
    assert "| kind | pretrain |" in text and "x axis: training tokens" in text
    assert "checkpoint-300/trainer\\_state.json" in text  # Markdown-escaped
    assert written["cards"] == {"base": str(run / "README.md")}
    card = ModelCard.load(run / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["chatforge", "gpt2"] and card.data.language == ["en", "zh"]
    assert MARKER in card.text and "AutoModelForCausalLM.from_pretrained" in card.text
    monkeypatch.chdir(run)
    assert report(".")["out"] == "."  # again, from inside: what it wrote is its own to replace


def test_two_runs_overlaid_with_unique_names(base_model_dir, tmp_path):
    first = copy_run(base_model_dir, tmp_path / "a" / "run")
    second = copy_run(base_model_dir, tmp_path / "b" / "run")
    out = tmp_path / "both"
    written = report(first, second, out=str(out))
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "|  | a/run | b/run |" in text
    assert len(written["plots"]) == 3 and all(Path(p).parent == out for p in written["plots"])
    assert set(written["cards"]) == {"a/run", "b/run"}
    assert Path(written["cards"]["a/run"]) == first / "README.md"


def test_card_model_index_equals_the_eval_record(base_model_dir, tmp_path):
    run = copy_run(base_model_dir, tmp_path / "base")
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "eval": {**EVAL, "model": str(run)}}))
    report(run)
    card = ModelCard.load(run / "README.md")
    got = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert got == {("arc_easy", "acc"): 0.41, ("arc_easy", "acc_norm"): 0.4, ("hellaswag", "acc"): 0.27}
    assert all(r.task_type == "text-generation" and r.dataset_type == r.dataset_name for r in card.data.eval_results)
    assert "model-index" in (run / "README.md").read_text(encoding="utf-8")
    text = (run / "report.md").read_text(encoding="utf-8")
    assert "| arc\\_easy | acc | 0.41 ± 0.02 | 100 |" in text and "| hellaswag | acc | 0.27 | 50 |" in text
    assert "| core | 0.12 |" in text


def test_eval_json_record_for_this_folder(base_model_dir, tmp_path):
    run = copy_run(base_model_dir, tmp_path / "base")
    other = {**EVAL, "model": str(tmp_path / "elsewhere"), "tasks": {"piqa": {"metrics": {"acc": 0.9}}}}
    (run / "eval.json").write_text(json.dumps({"models": [other, {**EVAL, "model": str(run)}]}))
    report(run)
    names = {r.dataset_name for r in ModelCard.load(run / "README.md").data.eval_results}
    assert names == {"arc_easy", "hellaswag"}


def test_a_readme_the_user_wrote_is_never_replaced(base_model_dir, tmp_path):
    run = copy_run(base_model_dir, tmp_path / "base")
    (run / "README.md").write_text("# my notes\n", encoding="utf-8")
    out = tmp_path / "rep"
    written = report(run, out=str(out))
    assert (run / "README.md").read_text(encoding="utf-8") == "# my notes\n"
    assert written["cards"] == {"base": str(out / "base" / "README.md")}
    assert ModelCard.load(out / "base" / "README.md").data.model_name == "base"
    assert "(<base/README.md>)" in (out / "report.md").read_text(encoding="utf-8")


def test_a_foreign_model_folder_is_only_read(base_model_dir, tmp_path, monkeypatch):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for name in MODEL_FILES:  # a plain Hugging Face folder with a chat template, no chatforge marker
        shutil.copy(Path(base_model_dir) / name, foreign / name)
    before = snapshot(foreign)
    monkeypatch.chdir(tmp_path)
    written = report(foreign, samples=2)
    assert Path(written["out"]) == Path("report")  # not the model folder: chatforge did not write it
    assert snapshot(foreign) == before
    text = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    assert "unknown (not written by chatforge)" in text
    assert "## Sample answers" in text and "| 你好 |" in text and "| Hello! |" in text
    assert ModelCard.load(tmp_path / "report" / "foreign" / "README.md").data.tags == ["chatforge", "gpt2"]
    with pytest.raises(ChatforgeError, match="did not write"):
        report(foreign, out=str(foreign / "report"))
    assert snapshot(foreign) == before


def test_tensorboard_logs_give_the_tokens_per_s_curve(base_model_dir, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run = copy_run(base_model_dir, tmp_path / "base")
    writer = SummaryWriter(str(run / "logs"))  # what the Trainer's TensorBoard callback writes
    for step in (10, 20, 30):
        writer.add_scalar("train/tokens_per_s", 1000.0 + step, step)
        writer.add_scalar("train/loss", 99.0, step)  # trainer_state.json wins for what it has
    writer.close()
    written = report(run, out=str(tmp_path / "rep"))
    assert str(tmp_path / "rep" / "tokens_per_s.png") in written["plots"]
    text = (tmp_path / "rep" / "report.md").read_text(encoding="utf-8")
    assert "checkpoint-300/trainer\\_state.json, TensorBoard logs" in text
    curves = read_run(run, "base").curves
    assert curves["tokens_per_s"] == [(10, 1010.0), (20, 1020.0), (30, 1030.0)]
    assert 99.0 not in [value for _, value in curves["loss"]]


def test_files_in_out_that_chatforge_report_did_not_write_are_refused(base_model_dir, tmp_path):
    run = copy_run(base_model_dir, tmp_path / "base")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "report.md").write_text("my report\n")
    with pytest.raises(ChatforgeError, match="did not write"):
        report(run, out=str(theirs))
    assert (theirs / "report.md").read_text() == "my report\n" and not (run / "README.md").exists()
    plot = tmp_path / "plot"
    plot.mkdir()
    (plot / "train_loss.png").write_bytes(b"mine")
    with pytest.raises(ChatforgeError, match=r"train_loss\.png exists"):
        report(run, out=str(plot))
    assert (plot / "train_loss.png").read_bytes() == b"mine"


def test_bad_input_is_one_clear_error(base_model_dir, tmp_path):
    run = copy_run(base_model_dir, tmp_path / "base")
    before = snapshot(run)
    with pytest.raises(ChatforgeError, match="no such folder"):
        report(tmp_path / "missing")
    with pytest.raises(ChatforgeError, match="at least one RUN_DIR"):
        report()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ChatforgeError, match="not a run or model folder"):
        report(tmp_path / "empty")
    with pytest.raises(ChatforgeError, match="given twice"):
        report(run, run, out=str(tmp_path / "rep"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ChatforgeError, match="not a folder"):
        report(run, out=str(tmp_path / "file"))
    with pytest.raises(ChatforgeError, match="--samples must be <= 20"):
        build(ReportConfig, runs=[str(run)], samples=21)
    assert not (tmp_path / "rep").exists() and snapshot(run) == before
