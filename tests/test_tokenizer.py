"""The tokenizer: lossless on any UTF-8, special tokens atomic, loadable by plain transformers."""

from transformers import AutoTokenizer

from chatforge.text.tokenizer import SPECIAL_TOKENS

SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "你好，世界！今天的天气非常好，我们去公园散步吧。",
    "emoji 🚀🎉👩‍💻 and mixed 中文 text",
    "def square(x):\n    return x ** 2  # code\n\tindent",
    "  leading spaces, trailing newline\n",
]


def test_round_trip_and_no_unknown(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    for text in SAMPLES:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        assert tok.unk_token_id is None or tok.unk_token_id not in ids


def test_special_tokens_are_single_ids(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = [tok.encode(t, add_special_tokens=False) for t in SPECIAL_TOKENS]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == len(SPECIAL_TOKENS)
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert "{% generation %}" in tok.chat_template


def test_vocab_size_matches_request(tokenizer_dir):
    assert len(AutoTokenizer.from_pretrained(tokenizer_dir)) == 1024


def test_fast_batch_encoder_gives_the_same_ids(tokenizer_dir):
    """`data prepare`'s tiktoken path: the same ids as the tokenizer itself, Chinese, special tokens written
    in the text, emoji and odd whitespace included; anything not plain byte-level BPE gets no fast path."""
    from tokenizers import normalizers

    from chatforge.text.sources import SourceOptions, iter_texts
    from chatforge.text.tokenizer import fast_batch_encoder, load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    encode = fast_batch_encoder(tok)
    assert encode is not None
    texts = list(iter_texts(SourceOptions(data=["demo:en", "demo:zh"]))) + [
        "a<|endoftext|>b <|im_start|>user\nhi<|im_end|>", "  two  spaces  ", "数字123 和 emoji 😀🎉\t\ttabs\n\n\n",
        "中文标点，。！？——《》", "", "x" * 3000, "don't we'll I'd"]
    assert encode(texts) == [tok.encode(t, add_special_tokens=False) for t in texts]

    tok.backend_tokenizer.normalizer = normalizers.NFKC()
    assert fast_batch_encoder(tok) is None


def test_a_tokenizer_an_older_chatforge_marked_is_replaced(tmp_path, tokenizer_dir):
    """Markers from before they listed their files: a folder of transformers' tokenizer files is still ours to
    replace (a user's file beside them is not: tests/test_options.py)."""
    import json
    import shutil

    from conftest import run_cli

    out = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, out)
    marker = out / "chatforge_output.json"
    record = json.loads(marker.read_text())
    assert record.pop("files")  # what this version writes
    marker.write_text(json.dumps(record))
    run_cli("tokenizer", "train", "--data", "demo:en", "--vocab-size", 300, "--out", out)
    assert len(AutoTokenizer.from_pretrained(out)) == 300
