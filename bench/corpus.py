"""A deterministic synthetic English corpus for the benchmarks (no download needed).

A word-level bigram Markov chain fitted on the chatterbot demo dialogues (`demo:en`, ~200 kB) emits
documents of 40-400 words: learnable text (the loss falls well below the unigram entropy) of any size.
The file is cached as JSON lines ({"text": ...}) so repeated runs reuse it.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path


def make_corpus(path: str | Path, megabytes: float, seed: int = 0) -> Path:
    path = Path(path)
    if path.exists() and path.stat().st_size >= megabytes * 1e6 * 0.98:
        return path
    from chatforge.text.sources import SourceOptions, iter_texts

    follow: dict[str, list[str]] = defaultdict(list)
    for text in iter_texts(SourceOptions(data=["demo:en"])):
        words = ["<s>"] + text.replace("\n", " \n ").split(" ") + ["</s>"]
        for a, b in zip(words, words[1:]):
            if b:
                follow[a].append(b)
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    written = 0
    with open(tmp, "w", encoding="utf-8") as out:
        while written < megabytes * 1e6:
            words, word, target = [], "<s>", rng.randint(40, 400)
            while len(words) < target:
                word = rng.choice(follow[word]) if follow.get(word) else "</s>"
                if word == "</s>":  # end of a dialogue: start another one inside the same document
                    word = "<s>"
                    words.append("\n")
                    continue
                words.append(word)
            text = " ".join(words).replace(" \n ", "\n").strip()
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            out.write(line)
            written += len(line.encode("utf-8"))
    tmp.replace(path)
    return path


if __name__ == "__main__":
    import sys

    p = make_corpus(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 4)
    print(p, p.stat().st_size)
