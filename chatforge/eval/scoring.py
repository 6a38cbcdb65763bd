"""Log-likelihoods for lm-eval's requests: each shared context runs once, through a KV cache.

A multiple-choice question asks for log P(choice | context) for every choice: lm-eval's `hf` model runs
the whole context once per choice and takes a vocabulary-wide log-softmax at every position. Here a
request's model input splits into a prefix (the context, up to the position that predicts the first
continuation token) and a suffix (the rest of the continuation). Requests are grouped by prefix; a batch
runs its prefixes once, keeps their keys/values, and runs every suffix against its prefix's cache. The LM
head runs only at scored positions. Identical requests are scored once (lm-eval's one-token cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chatforge.errors import ChatforgeError

PLAIN_HEAD = ("gpt2", "llama")  # logits = lm_head(last hidden state): the head can run on chosen positions only
TOKENS_PER_BATCH = 8192  # padded tokens per forward: past this, bigger batches gain nothing on a CPU


def loglikelihoods(call, requests: list[tuple[list[int], list[int]]], max_length: int,
                   batch_size: int) -> list[tuple[float, bool]]:
    """(context ids, continuation ids) -> (log P(continuation | context), whether greedy decoding gives it).
    `call(fn, *args)` runs `fn(model, *args)` where the model lives (`Engine.call`)."""
    groups: dict[tuple, dict[tuple, int]] = {}  # prefix -> suffix -> its index in the group
    keys = []
    for ctx, cont in requests:
        if not ctx or len(cont) > max_length:  # lm-eval's `hf` model asserts both away
            raise ChatforgeError(f"a request with a {len(ctx)}-token context and a {len(cont)}-token continuation: "
                                 f"the continuation must fit the model's window ({max_length}) after a context")
        inp = (ctx + cont)[-(max_length + 1):][:-1]  # as lm-eval: truncated from the left
        cut = len(inp) - len(cont) + 1
        prefix, suffix = tuple(inp[:cut]), tuple(inp[cut:])
        suffixes = groups.setdefault(prefix, {})
        suffixes.setdefault(suffix, len(suffixes))
        keys.append((prefix, suffix))
    order = sorted(groups, key=len, reverse=True)
    scored: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    start = 0
    while start < len(order):  # longest prefixes first: a batch is padded to its first one
        end, rows, widest = start, 0, 0
        while end < len(order) and end - start < batch_size:
            suffixes = [s for s in groups[order[end]] if s]
            new_widest = max([widest, *map(len, suffixes)])
            cost = (end - start + 1) * len(order[start]) + (rows + len(suffixes)) * new_widest
            if end > start and cost > TOKENS_PER_BATCH:
                break
            rows, widest, end = rows + len(suffixes), new_widest, end + 1
        batch = order[start:end]
        for prefix, results in zip(batch, call(score_batch, batch, [list(groups[p]) for p in batch])):
            for suffix, result in zip(groups[prefix], results):
                scored[prefix, suffix] = result
        start = end
    answers = []
    for (_, cont), key in zip(requests, keys):
        logprobs, greedy = scored[key]
        target = torch.tensor(cont)[-len(logprobs):]
        answers.append((float(logprobs.gather(1, target[:, None]).sum()), bool((greedy == target).all())))
    return answers


def _pad(seqs: list[tuple], width: int) -> torch.Tensor:
    x = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        x[r, :len(s)] = torch.tensor(s, dtype=torch.long)
    return x


def _logits_at(model, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, **kw):
    """Logits [len(rows), V] at (rows, cols) of a forward over `x`, and the forward's KV cache."""
    if model.config.model_type in PLAIN_HEAD:
        out = model.base_model(input_ids=x, use_cache=True, **kw)
        logits = model.get_output_embeddings()(out.last_hidden_state[rows, cols])
    else:  # any other model through its own head (softcapping, logit scales)
        out = model(input_ids=x, use_cache=True, **kw)
        logits = out.logits[rows, cols]
    return logits.float(), out.cache


def score_batch(model, prefixes: list[tuple], suffixes: list[list[tuple]]) -> list[list[tuple]]:
    """For each prefix and each of its suffixes: (log-probs [1 + len(suffix), V], argmax): the positions
    that predict the continuation. Runs on the engine thread."""
    device = next(model.parameters()).device
    lengths = torch.tensor([len(p) for p in prefixes])
    width = int(lengths.max())
    # right padding needs no mask: causal attention never looks forward
    first, cache = _logits_at(model, _pad(prefixes, width).to(device), torch.arange(len(prefixes), device=device),
                              (lengths - 1).to(device))
    pairs = [(g, s) for g, group in enumerate(suffixes) for s in group if s]
    rest = None
    if pairs:
        owner = torch.tensor([g for g, _ in pairs])
        cache.reorder_cache(owner.to(device))  # each suffix row gets its prefix's keys/values
        span = max(len(s) for _, s in pairs)
        mask = torch.zeros((len(pairs), width + span), dtype=torch.long)
        mask[:, :width] = torch.arange(width)[None, :] < lengths[owner][:, None]  # hide the prefix padding
        mask[:, width:] = 1
        # padding repeats the row's last position: past it a short row could outrun the position table
        last = torch.tensor([len(s) - 1 for _, s in pairs])
        positions = lengths[owner][:, None] + torch.minimum(torch.arange(span)[None, :], last[:, None])
        rows = torch.tensor([r for r, (_, s) in enumerate(pairs) for _ in s], device=device)
        cols = torch.tensor([c for _, s in pairs for c in range(len(s))], device=device)
        rest, _ = _logits_at(model, _pad([s for _, s in pairs], span).to(device), rows, cols, cache=cache,
                             attention_mask=mask.to(device), position_ids=positions.to(device))
        rest = F.log_softmax(rest, dim=-1).cpu()
    first = F.log_softmax(first, dim=-1).cpu()
    out, offset = [], 0
    for g, group in enumerate(suffixes):
        results = []
        for s in group:
            logprobs = torch.cat([first[g:g + 1], rest[offset:offset + len(s)]]) if s else first[g:g + 1]
            offset += len(s)
            results.append((logprobs, logprobs.argmax(-1)))
        out.append(results)
    return out
