"""Log-likelihoods for lm-eval's requests: each shared context runs once, its continuations packed after it.

A multiple-choice question asks for log P(choice | context) for every choice: lm-eval's `hf` model runs
the whole context once per choice and takes a vocabulary-wide log-softmax at every position. Here a
request's model input splits into a prefix (the context, up to the position that predicts the first
continuation token) and a suffix (the rest of the continuation). Requests are grouped by prefix, and each
group is one row (more where its suffixes pass the model's window): the prefix, then every suffix, with
an attention mask that lets each suffix see the prefix and its own earlier tokens only, and positions that
restart after the prefix for each suffix.
The LM head runs only at scored positions; identical requests are scored once (lm-eval's one-token
cache). bench/README.md has the measurements behind the choices (packing beat a shared KV cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chatforge.errors import ChatforgeError

PLAIN_HEAD = ("gpt2", "llama")  # logits = lm_head(last hidden state): the head can run on chosen positions only
TOKENS_PER_BATCH = 2048  # padded tokens per forward: more spill the activations out of the CPU caches (bench/README.md)


def loglikelihoods(call, requests: list[tuple[list[int], list[int]]], max_length: int,
                   batch_size: int) -> list[tuple[float, bool]]:
    """(context ids, continuation ids) -> (log P(continuation | context), whether greedy decoding gives it).
    `call(fn, *args)` runs `fn(model, *args)` where the model lives (`Engine.call`)."""
    rows: dict[tuple, list[tuple]] = {}  # (prefix, n) -> the suffixes packed in that prefix's n-th row
    width: dict[tuple, int] = {}
    newest: dict[tuple, int] = {}  # prefix -> its newest row's n
    waiting: dict[tuple, list[int]] = {}  # (prefix, suffix) -> the requests it answers
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont or len(cont) > max_length:  # lm-eval's `hf` model asserts these away
            raise ChatforgeError(f"a request with a {len(ctx)}-token context and a {len(cont)}-token continuation: "
                                 f"the continuation must be 1 to {max_length} tokens (the model's window), "
                                 f"after a context")
        inp = (ctx + cont)[-(max_length + 1):][:-1]  # as lm-eval: truncated from the left
        cut = len(inp) - len(cont) + 1
        prefix, suffix = tuple(inp[:cut]), tuple(inp[cut:])
        if (prefix, suffix) not in waiting:  # identical requests are scored once
            row = (prefix, newest.setdefault(prefix, 0))
            # a row's attention costs its width squared: rolling windows that follow the same token share a
            # one-token prefix, and packing hundreds of them would cost far more than the prefix saves
            if row in rows and width[row] + len(suffix) > len(prefix) + max_length:
                newest[prefix] += 1
                row = (prefix, newest[prefix])
            rows.setdefault(row, []).append(suffix)
            width[row] = width.get(row, len(prefix)) + len(suffix)
        waiting.setdefault((prefix, suffix), []).append(i)
    order = sorted(rows, key=width.get, reverse=True)
    answers: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    start = 0
    while start < len(order):  # widest rows first: a batch is padded to its first row
        size = max(1, min(batch_size, TOKENS_PER_BATCH // width[order[start]]))
        batch = order[start:start + size]
        # answered batch by batch: a batch's log-probs span the vocabulary at every scored position, so
        # keeping them all would hold ~V x 4 bytes per scored token (a perplexity task: tens of GB)
        prefixes, groups = [p for p, _ in batch], [rows[r] for r in batch]
        _answer(requests, answers, waiting, prefixes, groups, call(score_batch, prefixes, groups))
        start += size
    return answers


def _answer(requests, answers, waiting, prefixes, groups, scored) -> None:
    """Fill `answers` for every request waiting on one batch's `scored` rows (their tensors die on return)."""
    for prefix, group, results in zip(prefixes, groups, scored):
        for suffix, (logprobs, greedy) in zip(group, results):
            for i in waiting.pop((prefix, suffix)):
                target = torch.tensor(requests[i][1])[-len(logprobs):]
                answers[i] = (float(logprobs.gather(1, target[:, None]).sum()), bool((greedy == target).all()))


def _pad(seqs: list[tuple], width: int) -> torch.Tensor:
    x = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        x[r, :len(s)] = torch.tensor(s, dtype=torch.long)
    return x


def score_batch(model, prefixes: list[tuple], suffixes: list[list[tuple]]) -> list[list[tuple]]:
    """For each prefix and each of its suffixes: (log-probs [1 + len(suffix), V], argmax), the positions
    that predict the continuation. One forward over rows [prefix, suffix 1, suffix 2, ...]. Runs on the
    engine thread."""
    device = next(model.parameters()).device
    rows = [list(p) + [t for s in group for t in s] for p, group in zip(prefixes, suffixes)]
    width = max(map(len, rows))
    allowed = torch.zeros((len(rows), width, width), dtype=torch.bool)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    at_rows, at_cols = [], []  # where the scored logits are
    for r, (prefix, group) in enumerate(zip(prefixes, suffixes)):
        n = len(prefix)
        allowed[r, :n, :n] = torch.ones((n, n), dtype=torch.bool).tril()
        positions[r, :n] = torch.arange(n)
        start = n
        for suffix in group:
            end = start + len(suffix)
            allowed[r, start:end, :n] = True
            allowed[r, start:end, start:end] = torch.ones((end - start, end - start), dtype=torch.bool).tril()
            positions[r, start:end] = torch.arange(n, n + end - start)
            at_rows += [r] * (1 + end - start)
            at_cols += [n - 1, *range(start, end)]
            start = end
        allowed[r, range(start, width), range(start, width)] = True  # padding sees itself: no empty softmax
    x = _pad(rows, width).to(device)
    mask, positions = allowed[:, None].to(device), positions.to(device)
    at_rows, at_cols = torch.tensor(at_rows, device=device), torch.tensor(at_cols, device=device)
    if model.config.model_type in PLAIN_HEAD:
        hidden = model.base_model(input_ids=x, attention_mask=mask, position_ids=positions, use_cache=False)
        logits = model.get_output_embeddings()(hidden.last_hidden_state[at_rows, at_cols])
    else:  # any other model through its own head (softcapping, logit scales)
        out = model(input_ids=x, attention_mask=mask, position_ids=positions, use_cache=False)
        logits = out.logits[at_rows, at_cols]
    logprobs = F.log_softmax(logits.float(), dim=-1).cpu()
    greedy = logprobs.argmax(-1)
    out, offset = [], 0
    for group in suffixes:
        results = []
        for suffix in group:
            span = slice(offset, offset + 1 + len(suffix))
            results.append((logprobs[span], greedy[span]))
            offset += 1 + len(suffix)
        out.append(results)
    return out
