"""Options are declared once, and bad ones never cost the user a file: 74 bad command lines, each one line,
exit 2, no traceback, and every file in the sandbox byte for byte as it was."""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import importlib.util
import shutil
from pathlib import Path

import pytest

from chatforge import cli, config

SANDBOX_FILES = {"mine/notes.txt": "my own notes\n", "mine/data/keep.txt": "precious\n",
                 "hfdir/config.json": "{}\n", "hfdir/README.md": "someone else's model\n",
                 "corpus/a.txt": "hello world, a tiny corpus of text\n" * 50, "file.txt": "just a file\n",
                 "ds.json": '{"zero_optimization": {"stage": 2}}\n'}


def _flags_of(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions if not isinstance(a, argparse._HelpAction)}


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
                yield from (_subparsers(sub) if nested else [(name, sub)])


def test_every_field_has_a_flag_and_every_flag_a_field():
    parser = cli.build_parser()
    commands = cli._configs()
    seen = 0
    for name, sub in _subparsers(parser):
        cls = next(c[0] for key, c in commands.items() if key.split()[-1] == name)
        fields = {n for n in config.option_names(cls)
                  if all(f.metadata.get("cli", True) for f in _all_fields(cls) if f.name == n)}
        assert _flags_of(sub) - set(cli.RUN_FLAGS) == fields, name
        seen += 1
    assert seen == len(commands) == 13


def _all_fields(cls):
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) or f.name in config.nested_groups(cls):
            yield from _all_fields(config.nested_groups(cls)[f.name])
        else:
            yield f


def test_help_shows_each_default_once_from_the_field():
    parser = cli.build_parser()
    sub = dict(_subparsers(parser))["pretrain"]
    text = sub.format_help()
    assert "(default: 8192)" in text and "(default: cosine)" in text
    assert text.count("--learning-rate") == 2  # usage line and option list


def test_yaml_string_where_a_list_is_meant_is_one_source(tmp_path):
    from chatforge.train.pretrain import PretrainConfig

    (tmp_path / "c.yaml").write_text("data: corpus/a.txt\nlearning_rate: 1\nmin_lr_ratio: 5e-2\nmax_steps: 1e3\n")
    cfg = config.build(PretrainConfig, str(tmp_path / "c.yaml"))
    assert cfg.data == ["corpus/a.txt"] and cfg.learning_rate == 1.0
    assert cfg.min_lr_ratio == 0.05 and cfg.max_steps == 1000  # YAML reads 5e-2 as a string


def _sandbox(root: Path, tokenizer_dir: str, base_model_dir: str) -> None:
    for name, text in SANDBOX_FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    shutil.copytree(tokenizer_dir, root / "tok")
    shutil.copytree(base_model_dir, root / "model", ignore=shutil.ignore_patterns("checkpoint-*", "logs"))
    run = root / "run"  # a chatforge run someone else's tool dropped a checkpoint into
    shutil.copytree(root / "model", run)
    (run / "checkpoint-7").mkdir()
    (run / "checkpoint-7" / "model.safetensors").write_text("not ours")
    (root / "qs").mkdir()  # a previous quickstart's folder (its marker is all quickstart checks)
    (root / "qs" / "chatforge_output.json").write_text('{"kind": "quickstart", "written_by": "chatforge"}')
    (root / "qs" / "notes.txt").write_text("the user's notes about that run\n")
    (root / "demo_corpus").mkdir()  # a folder whose name starts like the demo corpus
    (root / "demo_corpus" / "a.txt").write_text("the user's own corpus\n" * 20)
    (root / "theirs").mkdir()  # another tool's run folder: a run_config.yaml is no chatforge marker
    (root / "theirs" / "run_config.yaml").write_text("seed: 1\n")
    (root / "theirs" / "model.safetensors").write_text("their weights")
    (root / "notok").mkdir()
    (root / "notok" / "config.json").write_text((root / "model" / "config.json").read_text())
    shutil.copy(root / "model" / "model.safetensors", root / "notok")
    (root / "bad.gz").write_bytes(b"\x1f\x8b\x08\x00garbage that is not deflate")
    (root / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"text": "hello"}\n' * 200)[:40])
    import zstandard

    whole = zstandard.ZstdCompressor().compress(" ".join(str(i * 7919 % 10007) for i in range(20000)).encode())
    (root / "cut.txt.zst").write_bytes(whole[:len(whole) // 2])
    (root / "y_type.yaml").write_text("data: [corpus]\nvocab_size: big\n")
    (root / "y_key.yaml").write_text("data: [corpus]\n1: 2\n")
    (root / "y_latin1.yaml").write_bytes("data: [corpus]\nout: caf\xe9\n".encode("latin-1"))
    (root / "y_unknown.yaml").write_text("data: [corpus]\nlearning_rat: 0.1\n")
    (root / "y_list.yaml").write_text("- data\n- corpus\n")
    (root / "y_bad.yaml").write_text("data: [corpus\n")
    (root / "y_deep.yaml").write_text("data: " + "[" * 600 + "]" * 600 + "\n")
    (root / "deep.jsonl").write_text('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    shutil.copytree(root / "tok", root / "tok_notes")  # a tokenizer the user keeps notes and shards in
    (root / "tok_notes" / "notes.txt").write_text("how I made it\n")
    brk = root / "brk"  # a chatforge run the user dropped a corpus into, named with glob characters
    shutil.copytree(root / "model", brk)
    (brk / "corpus[2024].txt").write_text("the user's own corpus\n" * 20)
    (root / "fakeshards").mkdir()  # a shard folder whose manifest another tool wrote
    (root / "fakeshards" / "manifest.json").write_text('{"dtype": "float99", "train": {}, "val": {}}')


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


M = ["--max-steps", "1", "--report-to", "none"]
BAD = [
    # data loss: outputs that are inputs, the user's own folders, the working folder, files
    ("prepare into a user folder", ["data", "prepare", "--data", "corpus", "--tokenizer", "tok", "--out", "mine"],
     "not written by chatforge"),
    ("prepare over its corpus", ["data", "prepare", "--data", "corpus", "--tokenizer", "tok", "--out", "corpus"],
     "would replace the input --data"),
    ("prepare over its tokenizer", ["data", "prepare", "--data", "corpus", "--tokenizer", "tok", "--out", "tok"],
     "would replace the input --tokenizer"),
    ("prepare into the working folder", ["data", "prepare", "--data", "corpus", "--tokenizer", "tok", "--out", "."],
     "working folder"),
    ("prepare into a file", ["data", "prepare", "--data", "corpus", "--tokenizer", "tok", "--out", "file.txt"],
     "not a folder"),
    ("sft over its model", ["sft", "--model", "model", "--data", "demo:en", "--out", "model", "--overwrite"],
     "would replace the input --model"),
    ("pretrain over its init", ["pretrain", "--data", "corpus", "--init-from", "model", "--out", "model",
                                "--overwrite", *M], "would replace the input --init-from"),
    ("pretrain into a user folder", ["pretrain", "--data", "corpus", "--out", "mine", *M], "not written by chatforge"),
    ("overwrite a foreign model", ["pretrain", "--data", "corpus", "--out", "hfdir", "--overwrite", *M],
     "not written by chatforge"),
    ("resume past a foreign checkpoint", ["pretrain", "--data", "corpus", "--out", "run", "--resume"],
     "checkpoint folder chatforge did not write"),
    ("quickstart into a user folder", ["quickstart", "--out", "mine"], "not written by chatforge"),
    ("quickstart into a model", ["quickstart", "--out", "model"], "not a quickstart one"),
    ("quickstart again", ["quickstart", "--out", "qs"], "already holds a run; pass --overwrite to replace it"),
    ("tokenizer over a model", ["tokenizer", "train", "--data", "corpus", "--out", "model"],
     "not written by chatforge for this step"),
    ("tokenizer into a file", ["tokenizer", "train", "--data", "corpus", "--out", "file.txt"], "not a folder"),
    ("tokenizer over its corpus", ["tokenizer", "train", "--data", "corpus", "--out", "corpus"],
     "would replace the input --data"),
    ("pretrain into the parent", ["pretrain", "--data", "corpus", "--out", "..", *M], "working folder"),
    ("glob input inside out", ["tokenizer", "train", "--data", "mine/*.txt", "--out", "mine"],
     "would replace the input --data"),
    ("glob input, overwrite", ["pretrain", "--data", "corpus/*.txt", "--out", "corpus", "--overwrite", *M],
     "would replace the input --data"),
    ("out inside its corpus", ["tokenizer", "train", "--data", "corpus", "--out", "corpus/tok"],
     "is inside the input --data"),
    ("a folder named demo-something", ["tokenizer", "train", "--data", "demo_corpus/a.txt", "--out", "demo_corpus"],
     "would replace the input --data"),
    ("resume another tool's run", ["pretrain", "--data", "corpus", "--out", "theirs", "--resume", *M],
     "not written by chatforge"),
    ("out under a file", ["data", "prepare", "--data", "corpus", "--tokenizer", "tok", "--out", "file.txt/sub"],
     "file.txt"),
    ("out is the home folder", ["tokenizer", "train", "--data", "corpus", "--out", "~"], "home folder"),
    ("empty source", ["tokenizer", "train", "--data", "", "--out", "t"], "empty source"),
    ("tokenizer over one holding user files", ["tokenizer", "train", "--data", "corpus", "--out", "tok_notes"],
     "it holds notes.txt, which would be lost"),
    ("input named like a glob, overwrite", ["pretrain", "--data", "brk/corpus[2024].txt", "--out", "brk",
                                            "--overwrite", *M], "would replace the input --data"),
    ("missing input, overwrite", ["pretrain", "--data", "nothing*.txt", "--out", "brk", "--overwrite", *M],
     "the pattern matches no files"),
    ("resume and overwrite", ["pretrain", "--data", "corpus", "--out", "brk", "--resume", "--overwrite", *M],
     "pass one of them"),
    ("heads that do not divide", ["pretrain", "--data", "corpus", "--d-model", "30", "--n-head", "4"],
     "--d-model 30 is not divisible by --n-head 4"),
    ("width the preset's heads do not divide", ["pretrain", "--data", "corpus", "--preset", "tiny", "--d-model", "100"],
     "--d-model 100 is not divisible by --n-head 6"),
    ("prompt not UTF-8", ["generate", "model", "--prompt", "caf\udce9"], "--prompt: not valid UTF-8"),
    ("generate a missing model", ["generate", "nomodel", "--prompt", "hi"], "nomodel: model directory not found"),
    ("JSON nested too deeply", ["data", "prepare", "--data", "deep.jsonl", "--tokenizer", "tok", "--out", "s"],
     "deep.jsonl:1: JSON nested too deeply"),
    ("foreign shard manifest", ["pretrain", "--data", "fakeshards", "--tokenizer", "tok", "--out", "r", *M],
     "not a chatforge shard manifest"),
    # YAML
    ("yaml value of the wrong type", ["tokenizer", "train", "--config", "y_type.yaml", "--out", "t"],
     "--vocab-size must be an integer"),
    ("yaml key not text", ["tokenizer", "train", "--config", "y_key.yaml", "--out", "t"], "option names must be text"),
    ("yaml not UTF-8", ["pretrain", "--config", "y_latin1.yaml"], "not UTF-8"),
    ("yaml unknown key", ["pretrain", "--config", "y_unknown.yaml"], "unknown option(s) learning_rat"),
    ("yaml not a mapping", ["pretrain", "--config", "y_list.yaml"], "must be a mapping"),
    ("yaml syntax", ["pretrain", "--config", "y_bad.yaml"], "invalid YAML"),
    ("yaml missing", ["pretrain", "--config", "nope.yaml"], "cannot read config"),
    ("yaml nested too deeply", ["pretrain", "--config", "y_deep.yaml"], "nested too deeply"),
    # inputs
    ("corrupt gz", ["tokenizer", "train", "--data", "bad.gz", "--out", "t"], "bad.gz: cannot read the file"),
    ("truncated gz", ["tokenizer", "train", "--data", "cut.jsonl.gz", "--out", "t"], "cut.jsonl.gz: cannot read"),
    ("truncated zst", ["tokenizer", "train", "--data", "cut.txt.zst", "--out", "t"], "cut.txt.zst: cannot read"),
    ("generate without tokenizer", ["generate", "notok", "--prompt", "hi"], "no tokenizer files"),
    ("generate without prompt", ["generate", "model"], "needs --prompt"),
    # numbers: types and ranges, all checked before any work
    ("vocab not a number", ["tokenizer", "train", "--data", "corpus", "--out", "t", "--vocab-size", "big"],
     "invalid int value"),
    ("vocab too small", ["tokenizer", "train", "--data", "corpus", "--out", "t", "--vocab-size", "100"],
     "--vocab-size must be >= 260"),
    ("negative learning rate", ["pretrain", "--data", "corpus", "--learning-rate", "-1"], "--learning-rate must be > 0"),
    ("zero learning rate", ["pretrain", "--data", "corpus", "--learning-rate", "0"], "--learning-rate must be > 0"),
    ("nan learning rate", ["pretrain", "--data", "corpus", "--learning-rate", "nan"], "finite number"),
    ("zero micro-batch", ["pretrain", "--data", "corpus", "--micro-batch-size", "0"], "--micro-batch-size must be >= 1"),
    ("zero grad-accum", ["sft", "--model", "model", "--data", "demo", "--grad-accum", "0"], "--grad-accum must be >= 1"),
    ("zero log-every", ["pretrain", "--data", "corpus", "--log-every", "0"], "--log-every must be >= 1"),
    ("negative d-model", ["pretrain", "--data", "corpus", "--d-model", "-5"], "--d-model must be >= 1"),
    ("dropout 2", ["pretrain", "--data", "corpus", "--dropout", "2"], "--dropout must be <= 1.0"),
    ("negative seed", ["pretrain", "--data", "corpus", "--seed", "-1"], "--seed must be >= 0"),
    ("huge seed", ["pretrain", "--data", "corpus", "--seed", str(2**70)], "--seed must be <= "),
    ("zero max-steps", ["pretrain", "--data", "corpus", "--max-steps", "0"], "--max-steps must be >= 1"),
    ("negative max-steps", ["pretrain", "--data", "corpus", "--max-steps", "-5"], "--max-steps must be >= 1"),
    ("negative n-layer", ["pretrain", "--data", "corpus", "--n-layer", "-1"], "--n-layer must be >= 1"),
    ("negative max-time", ["pretrain", "--data", "corpus", "--max-time", "-5"], "--max-time must be > 0"),
    ("unknown schedule", ["pretrain", "--data", "corpus", "--schedule", "bogus"], "invalid choice"),
    ("unknown precision", ["sft", "--model", "model", "--data", "demo", "--precision", "fp64"], "invalid choice"),
    ("unknown reporter", ["pretrain", "--data", "corpus", "--report-to", "pigeon"], "--report-to must be one of"),
    ("val-fraction 0", ["data", "prepare", "--data", "corpus", "--tokenizer", "tok", "--out", "s",
                        "--val-fraction", "0"], "--val-fraction must be > 0"),
    ("val-fraction 1.5", ["pretrain", "--data", "corpus", "--val-fraction", "1.5"], "--val-fraction must be"),
    ("unknown preset", ["pretrain", "--data", "corpus", "--preset", "huge"], "invalid choice"),
    ("unknown arch", ["pretrain", "--data", "corpus", "--arch", "gpt3"], "invalid choice"),
    ("top-p 0", ["generate", "model", "--prompt", "hi", "--top-p", "0"], "--top-p must be > 0"),
    ("negative temperature", ["chat", "model", "--prompt", "hi", "--temperature", "-1"], "--temperature must be >= 0"),
    ("zero new tokens", ["generate", "model", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be"),
    ("port out of range", ["serve", "model", "--port", "70000"], "--port must be <= 65535"),
    ("zero batch", ["serve", "model", "--max-batch", "0"], "--max-batch must be >= 1"),
    ("sft without model", ["sft", "--data", "demo"], "sft needs --model"),
    ("pretrain without data", ["pretrain", "--out", "r"], "pretrain needs --data"),
    ("unknown demo language", ["quickstart", "--lang", "xx", "--out", "q"], "unknown demo language"),
    ("unknown flag", ["pretrain", "--data", "corpus", "--learning-rat", "1"], "unrecognized arguments"),
    # sharding
    ("fsdp and deepspeed", ["pretrain", "--data", "corpus", "--fsdp", "--deepspeed", "ds.json"], "two ways to shard"),
    ("fsdp offload alone", ["sft", "--model", "model", "--data", "demo", "--fsdp-offload"], "it needs --fsdp"),
    ("muon under fsdp", ["pretrain", "--data", "corpus", "--fsdp", "--optimizer", "muon"], "not with --fsdp"),
    ("unknown optimizer", ["pretrain", "--data", "corpus", "--optimizer", "sgd"], "invalid choice"),
    ("deepspeed config missing", ["pretrain", "--data", "corpus", "--deepspeed", "nope.json"], "cannot read"),
    ("deepspeed config not JSON", ["dpo", "--model", "model", "--data", "p.jsonl", "--deepspeed", "y_bad.yaml"],
     "not a JSON config"),
    *([("deepspeed not installed", ["pretrain", "--data", "corpus", "--deepspeed", "ds.json"],
        "pip install deepspeed")] if importlib.util.find_spec("deepspeed") is None else []),
]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, tokenizer_dir, base_model_dir):
    root = tmp_path_factory.mktemp("sandbox")
    _sandbox(root, tokenizer_dir, base_model_dir)
    return root


@pytest.mark.parametrize("name,argv,match", BAD, ids=[b[0] for b in BAD])
def test_bad_command_line(sandbox, name, argv, match, capsys, monkeypatch):
    monkeypatch.chdir(sandbox)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = _snapshot(sandbox)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("chatforge: error:"), err
    assert match in lines[0], lines[0]
    assert "Traceback" not in err
    after = _snapshot(sandbox)
    assert {k: v for k, v in after.items() if k in before} == before, "a file of the user's changed"
    assert not [k for k in after if k not in before], \
        f"{name}: left {sorted(set(after) - set(before))}"


def test_at_least_forty_cases():
    assert len(BAD) >= 40
