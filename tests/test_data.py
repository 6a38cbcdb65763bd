"""Packed shards: every token of every document, boundaries where expected, a deterministic split."""

import gzip
import json
import os
import stat

import numpy as np
import pytest
import zstandard
from transformers import AutoTokenizer

from chatforge.data import DataConfig, load_split, prepare, read_manifest
from conftest import run_cli
from test_rl import refused


def _corpus(tmp_path, n=50):
    docs = [f"Document {i}: " + ("hello world 你好 " * (i % 7 + 1)).strip() for i in range(n)]
    (tmp_path / "corpus").mkdir()
    for i, d in enumerate(docs[: n // 2]):
        (tmp_path / "corpus" / f"{i:03d}.txt").write_text(d, encoding="utf-8")
    with gzip.open(tmp_path / "corpus" / "rest.jsonl.gz", "wt", encoding="utf-8") as f:
        for d in docs[n // 2:]:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    return docs


@pytest.mark.parametrize("fast_tokenizer", [True, False])
def test_shards_hold_every_token_with_boundaries(tmp_path, tokenizer_dir, fast_tokenizer):
    docs = _corpus(tmp_path)
    out = tmp_path / "shards"
    manifest = prepare(DataConfig(data=[str(tmp_path / "corpus")], out=str(out), tokenizer=tokenizer_dir,
                                  val_fraction=0.1, fast_tokenizer=fast_tokenizer, batch_docs=16), log=lambda *_: None)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    sep = tok.convert_tokens_to_ids("<|endoftext|>")
    expected = {"train": [], "val": []}
    for i, d in enumerate(docs):  # files sorted: 000..024.txt then rest.jsonl.gz, in order
        expected["val" if i % 10 == 0 else "train"] += tok.encode(d, add_special_tokens=False) + [sep]
    for split in ("train", "val"):
        tokens = load_split(out, split)
        assert tokens.dtype == np.uint16
        assert tokens.tolist() == expected[split]
        assert manifest[split]["tokens"] == len(expected[split])
    assert manifest["val"]["documents"] == 5 and manifest["train"]["documents"] == 45
    assert manifest["tokenizer_fingerprint"] and manifest["sources"] == [str(tmp_path / "corpus")]


def test_output_folders_get_the_users_permissions(tmp_path, tokenizer_dir):
    """Shards and tokenizers are built in a temporary sibling made by mkdir, so they end up with the umask's
    permissions like any folder the user makes, not mkdtemp's 0700 (unreadable to anyone else)."""
    _corpus(tmp_path)
    umask = os.umask(0o027)
    try:
        prepare(DataConfig(data=[str(tmp_path / "corpus")], out=str(tmp_path / "shards"), tokenizer=tokenizer_dir),
                log=lambda *_: None)
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "shards").stat().st_mode) == 0o750
    assert stat.S_IMODE(os.stat(tokenizer_dir).st_mode) == 0o777 & ~umask
    assert not list(tmp_path.glob(".shards.tmp-*"))


def test_rerun_reuses_and_changed_input_rebuilds(tmp_path, tokenizer_dir):
    _corpus(tmp_path)
    out = tmp_path / "shards"
    cfg = DataConfig(data=[str(tmp_path / "corpus")], out=str(out), tokenizer=tokenizer_dir)
    first = prepare(cfg, log=lambda *_: None)
    logs = []
    again = prepare(cfg, log=logs.append)
    assert again == first and "reusing" in logs[0]
    (tmp_path / "corpus" / "new.txt").write_text("a brand new document")
    rebuilt = prepare(cfg, log=lambda *_: None)
    assert rebuilt["cache_key"] != first["cache_key"]
    assert rebuilt["train"]["documents"] + rebuilt["val"]["documents"] == 51


def test_formats_and_cli(tmp_path, tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"body": ["parquet one", "parquet two"]}), src / "a.parquet")
    (src / "b.csv").write_text("\ufeffbody,other\ncsv one,x\n\"csv, two\",y\n")  # a BOM, as Windows tools write
    (src / "e.jsonl").write_text('\ufeff{"body": "jsonl after a BOM"}\n')
    (src / "f.csv").write_bytes(b"body\rcr one\rcr two\r")  # classic Mac / Excel line ends
    (src / "g.json").write_text('\ufeff{"body": "json lines"}\n{"body": "after a BOM"}\n')
    cctx = zstandard.ZstdCompressor()
    (src / "c.jsonl.zst").write_bytes(cctx.compress(b'{"body": "zst one"}\n{"body": "zst two"}\n'))
    (src / "d.json").write_text(json.dumps([{"body": "json one"}, {"body": ""}]))
    proc = run_cli("data", "prepare", "--data", str(src / "*"), "--text-field", "body", "--tokenizer",
                   tokenizer_dir, "--out", tmp_path / "out", "--val-fraction", "0.2")
    m = read_manifest(tmp_path / "out")
    assert m["train"]["documents"] + m["val"]["documents"] == 12
    assert m["skipped"] == {"empty document": 1}
    assert "1 skipped (empty document)" in proc.stdout + proc.stderr


def test_doc_per_line_and_invalid_utf8(tmp_path, tokenizer_dir):
    (tmp_path / "lines.txt").write_bytes(b"line one\nline two\n\nbad \xff byte\n")
    run_cli("data", "prepare", "--data", tmp_path / "lines.txt", "--doc-per-line", "--tokenizer", tokenizer_dir,
            "--out", tmp_path / "out")
    m = read_manifest(tmp_path / "out")
    assert m["train"]["documents"] + m["val"]["documents"] == 3
    assert m["invalid_utf8_lines"] == 1 and m["skipped"] == {"empty document": 1}
    strict = run_cli("data", "prepare", "--data", tmp_path / "lines.txt", "--doc-per-line", "--strict",
                     "--tokenizer", tokenizer_dir, "--out", tmp_path / "out2", check=False)
    assert strict.returncode == 2 and "lines.txt:4: invalid UTF-8" in strict.stderr


def test_text_that_is_not_unicode_is_counted_not_fatal(tmp_path, tokenizer_dir):
    """A lone surrogate escape in JSON and invalid UTF-8 in a CSV are replaced and counted like invalid UTF-8
    in text files (an error under --strict); a document longer than csv's default field limit is read."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text('{"text": "caf\\ud800 ok"}\n{"text": "emoji \\ud83d\\ude00 pair"}\n')
    (src / "b.csv").write_bytes(b"text\nfine row\nbad \xff row\n\"" + b"long " * 40_000 + b"\"\n")
    run_cli("data", "prepare", "--data", src, "--tokenizer", tokenizer_dir, "--out", tmp_path / "out")
    m = read_manifest(tmp_path / "out")
    assert m["train"]["documents"] + m["val"]["documents"] == 5
    assert m["invalid_utf8_lines"] == 2  # the lone surrogate's line and the CSV's bad line; the emoji pair is fine
    for bad in ("a.jsonl", "b.csv"):
        strict = run_cli("data", "prepare", "--data", src / bad, "--strict", "--tokenizer", tokenizer_dir,
                         "--out", tmp_path / f"strict_{bad}", check=False)
        assert strict.returncode == 2 and "Traceback" not in strict.stderr and f"{bad}:" in strict.stderr


def test_files_that_would_be_read_wrong(tmp_path, tokenizer_dir, capsys):
    """CSV rows with more or fewer fields than the header (csv.DictReader would drop the extra text unseen) are
    counted and skipped; UTF-16 text (which decodes as "UTF-8" with NULs) is refused; `.GZ` is gzip too."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.csv").write_text("id,text\n1,hello there\n2,second doc\n3,third\n4,a, b and more\n5\n")
    with gzip.open(src / "B.TXT.GZ", "wb") as handle:
        handle.write("中文文本测试".encode())
    run_cli("data", "prepare", "--data", src, "--tokenizer", tokenizer_dir, "--out", tmp_path / "out")
    m = read_manifest(tmp_path / "out")
    assert m["train"]["documents"] + m["val"]["documents"] == 4 and m["invalid_utf8_lines"] == 0
    assert m["skipped"] == {"CSV row whose fields do not match the header": 2}
    err = refused(["data", "prepare", "--data", src / "a.csv", "--strict", "--tokenizer", tokenizer_dir,
                   "--out", tmp_path / "strict"], capsys)
    assert "a.csv:5: CSV row whose fields do not match the header (--strict)" in err
    for name, data in (("be.txt", "hello world\n".encode("utf-16-be")), ("bom.txt", "你好\n".encode("utf-16"))):
        (tmp_path / name).write_bytes(data)
        err = refused(["data", "prepare", "--data", tmp_path / name, "--tokenizer", tokenizer_dir,
                       "--out", tmp_path / f"o_{name}"], capsys)
        assert f"{name}: looks like UTF-16 text" in err


def test_fast_tokenizer_disagreement_falls_back(tmp_path, tokenizer_dir, monkeypatch):
    """If the tiktoken path ever splits a checked document differently, that batch and every later one
    are tokenized by `tokenizers`, and the run says so."""
    import importlib

    data_module = importlib.import_module("chatforge.data.prepare")  # the module, not the function of that name

    docs = _corpus(tmp_path)
    monkeypatch.setattr(data_module, "CHECK_EVERY", 1)
    monkeypatch.setattr("chatforge.text.tokenizer.fast_batch_encoder", lambda tok: lambda texts: [[1] for _ in texts])
    lines = []
    prepare(DataConfig(data=[str(tmp_path / "corpus")], out=str(tmp_path / "shards"), tokenizer=tokenizer_dir,
                       val_fraction=0.1, batch_docs=16), log=lines.append)
    assert any("tokenizers from here on" in line for line in lines)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    sep = tok.convert_tokens_to_ids("<|endoftext|>")
    expected = [t for i, d in enumerate(docs) if i % 10 for t in tok.encode(d, add_special_tokens=False) + [sep]]
    assert load_split(tmp_path / "shards", "train").tolist() == expected


def _documents(tokens: np.ndarray, sep: int) -> list[tuple]:
    """A split's documents (each ending at the separator), sorted: the order parts were merged in aside."""
    cuts = np.flatnonzero(tokens == sep) + 1
    return sorted(tuple(d.tolist()) for d in np.split(tokens, cuts) if len(d))


def test_parts_on_several_workers_merge_to_the_same_tokens(tmp_path, tokenizer_dir, capsys):
    """`data prepare --num-shards 3 --shard-index I` on three workers, then `data merge`: the same documents,
    tokens and train/validation split as one prepare over everything, with no token copied; and pretrain
    trains on the merged folder."""
    _corpus(tmp_path, n=60)
    src = str(tmp_path / "corpus")
    whole = prepare(DataConfig(data=[src], out=str(tmp_path / "whole"), tokenizer=tokenizer_dir, val_fraction=0.1),
                    log=lambda *_: None)
    parts = [str(tmp_path / f"part{i}") for i in range(3)]
    for i, part in enumerate(parts):
        run_cli("data", "prepare", "--data", src, "--tokenizer", tokenizer_dir, "--out", part, "--val-fraction", 0.1,
                "--num-shards", 3, "--shard-index", i)
    assert [read_manifest(p)["train"]["documents"] + read_manifest(p)["val"]["documents"] for p in parts] == [20] * 3
    run_cli("data", "merge", *parts, "--out", tmp_path / "all")
    merged = read_manifest(tmp_path / "all")
    assert [p.name for p in (tmp_path / "all").iterdir()] == ["manifest.json"]  # the tokens stay in the parts
    sep = whole["separator_id"]
    for split in ("train", "val"):
        assert merged[split]["tokens"] == whole[split]["tokens"]
        assert merged[split]["documents"] == whole[split]["documents"]
        got, want = load_split(tmp_path / "all", split), load_split(tmp_path / "whole", split)
        assert _documents(got, sep) == _documents(want, sep)
    # the parts of one split must all be there, each once; shards of another tokenizer never mix
    for args, message in (([parts[0], parts[1], "--out", tmp_path / "some"],
                           "must all be merged, each once: got part indices [0, 1] of [3]"),
                          ([parts[0], parts[0], "--out", tmp_path / "m2"], "a folder is named twice"),
                          ([*parts, "--out", f"{parts[0]}/inner"], "inside the part"),
                          ([*parts, "--out", parts[1]], "--out")):
        assert message in refused(["data", "merge", *args], capsys)
    err = refused(["data", "prepare", "--data", src, "--tokenizer", tokenizer_dir, "--out", tmp_path / "x",
                   "--num-shards", 2, "--shard-index", 2], capsys)
    assert "--shard-index 2 must be below --num-shards 2" in err
    run_cli("pretrain", "--data", tmp_path / "all", "--tokenizer", tokenizer_dir, "--out", tmp_path / "run",
            "--n-layer", 1, "--d-model", 32, "--n-head", 2, "--context-length", 32, "--max-steps", 3,
            "--report-to", "none")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 3


def test_weighted_mixture_of_shard_folders(tmp_path, tokenizer_dir, capsys):
    """`pretrain --data a/:3 --data b/:1`: each folder fills its share of an epoch (repeated or subsampled),
    deterministically; the mixture is in run_config.yaml; bad weights and mixed specs are one line."""
    from chatforge.data import PackedBlocks
    from chatforge.data.mixture import MixtureBlocks

    folders = {}
    for name, text in (("en", "hello world, a plain English document"), ("zh", "你好世界，这是一个中文文档")):
        src = tmp_path / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"text": f"{text} {i}"}, ensure_ascii=False) + "\n" for i in range(80)),
                       encoding="utf-8")
        folders[name] = str(tmp_path / f"shards_{name}")
        prepare(DataConfig(data=[str(src)], out=folders[name], tokenizer=tokenizer_dir), log=lambda *_: None)
    parts = [PackedBlocks(folders["en"], "train", 16), PackedBlocks(folders["zh"], "train", 16)]
    mix = MixtureBlocks(parts, [3.0, 1.0], seed=0)
    total = len(parts[0]) + len(parts[1])
    assert len(mix) == total and mix.counts == [round(total * 0.75), round(total * 0.25)]
    assert MixtureBlocks(parts, [1.5e308, 0.5e308], seed=0).counts == mix.counts  # their sum would be inf
    assert np.array_equal(mix.rows(range(len(mix))), MixtureBlocks(parts, [3.0, 1.0], seed=0).rows(range(len(mix))))
    en_rows = {tuple(r) for r in parts[0].rows(range(len(parts[0])))}
    drawn = [tuple(r) in en_rows for r in mix.rows(range(len(mix)))]
    assert sum(drawn) == mix.counts[0]  # every block of the en share comes from en, the rest from zh
    out = tmp_path / "run"
    proc = run_cli("pretrain", "--data", f"{folders['en']}:3", "--data", f"{folders['zh']}:1", "--tokenizer",
                   tokenizer_dir, "--out", out, "--n-layer", 1, "--d-model", 32, "--n-head", 2, "--context-length",
                   16, "--max-steps", 3, "--report-to", "none")
    assert "data mixture:" in proc.stdout and json.loads((out / "summary.json").read_text())["steps"] == 3
    assert f"{folders['en']}:3" in (out / "run_config.yaml").read_text()
    tok = ["--tokenizer", tokenizer_dir]
    for args, message in ((["--data", f"{folders['en']}:0", *tok], "a mixture weight must be a positive number"),
                          (["--data", f"{tmp_path / 'en.jsonl'}:0.5", *tok], "weights apply to shard folders"),
                          (["--data", f"{folders['en']}:1", "--data", tmp_path / "zh.jsonl", *tok],
                           "mix only with each other"),
                          (["--data", f"{folders['en']}:1"], "shard folders need --tokenizer DIR")):
        assert message in refused(["pretrain", *args, "--out", tmp_path / "bad"], capsys)
    assert not (tmp_path / "bad").exists()  # refused before any folder is made
