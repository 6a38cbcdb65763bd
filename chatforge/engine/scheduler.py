"""Continuous batching: requests, and the step that advances every running one.

Between decode steps the scheduler admits waiting requests into free slots (prefill, prompts of similar
length in one forward, their attention padded to the longest: 2.7-4x faster than one by one for 16 short
prompts), then decodes one
token for every active request in one batched forward, and retires finished or cancelled ones at once.
Active requests always occupy slots 0..n-1: a retired request's slot takes the last one's cache.

A request that fails (its prefill runs out of memory, its sampling meets non-finite numbers) fails alone
with its own error; the others go on.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

import torch

from chatforge.engine.detokenize import Detokenizer, find_stop, hold_back_stop_prefix
from chatforge.engine.sampling import SamplingParams, greedy_tokens, sample_next
from chatforge.errors import ChatforgeError


class Request:
    """One generation. Iterate it for text pieces; afterwards `finish_reason` ("stop"/"length") and the
    token counts are set. Every result of the request lives here, never on the engine."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, budget: int, detokenizer: Detokenizer,
                 on_event: Callable[[], None] | None = None):
        self.prompt_ids, self.params, self.budget = list(prompt_ids), params, budget
        self.on_event = on_event  # called on the engine thread after each event (an async server's wake-up)
        self.ids = list(prompt_ids)          # prompt + generated, for positions and repetition penalty
        self.out: list[int] = []             # generated ids
        self.text = ""                       # decoded generated text
        self.emitted = 0                     # characters of text already handed out
        self.detokenizer = detokenizer
        self.greedy_token: int | None = None  # argmax from the batched step, when greedy
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.done = False
        self.slot = -1
        self.logits: torch.Tensor | None = None
        self.events: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.out)

    def cancel(self) -> None:
        """Stop generating (the engine frees the slot before its next step)."""
        self.cancelled.set()

    def put(self, kind: str, value) -> None:
        self.events.put((kind, value))
        if self.on_event is not None:
            try:
                self.on_event()
            except Exception:  # a caller's hook must not fail this request's neighbours
                pass

    def __iter__(self) -> Iterator[str]:
        try:
            while True:
                kind, value = self.events.get()
                if kind == "text":
                    yield value
                elif kind == "error":
                    raise ChatforgeError(value)
                else:
                    return
        finally:
            self.cancel()  # no-op when finished; frees the slot when the caller stops early


# prompt tokens per prefill forward, counted padded (the attention's size, and a bound on the real tokens
# the matmuls see); past a few thousand, activations leave the CPU's caches
# (the same trade-off as TOKENS_PER_BATCH in eval/scoring.py)
PREFILL_TOKENS = 4096


def prefill_groups(requests: list[Request]) -> list[list[Request]]:
    """Requests to prefill together, shortest prompts first: a prompt joins the current group while padding
    to its length at most doubles the group's tokens and stays within PREFILL_TOKENS."""
    groups: list[list[Request]] = []
    real = 0  # prompt tokens in the current group
    for req in sorted(requests, key=lambda r: len(r.prompt_ids)):
        n = len(req.prompt_ids)
        if groups and (len(groups[-1]) + 1) * n <= min(PREFILL_TOKENS, 2 * (real + n)):
            groups[-1].append(req)
            real += n
        else:
            groups.append([req])
            real = n
    return groups


class Scheduler:
    """The engine thread's view of the running requests: admit, advance, retire."""

    def __init__(self, backend, max_batch: int, stop_ids: set[int], take_waiting: Callable[[], Request | None]):
        self.backend, self.max_batch, self.stop_ids = backend, max_batch, stop_ids
        self.take_waiting = take_waiting
        self.active: list[Request] = []  # index == KV-cache slot

    def step(self) -> None:
        # 1. admit waiting requests into free slots, prompts of similar length prefilled together
        admitted = []
        while len(self.active) + len(admitted) < self.max_batch:
            req = self.take_waiting()
            if req is None:
                break
            if req.cancelled.is_set():
                self.finish(req, "stop")
                continue
            admitted.append(req)
        for group in prefill_groups(admitted):
            self._prefill(group)
        # 2. pick each request's next token; retire finished ones
        done = [r for r in self.active if r.cancelled.is_set() or not self._advance_alone(r)]
        for req in sorted(done, key=lambda r: -r.slot):
            self._retire(req)
        if not self.active:
            return
        # 3. one batched forward for everyone still running
        logits = self.backend.decode([r.ids[-1] for r in self.active], [len(r.ids) - 1 for r in self.active])
        # one argmax for every greedy request in the batch; a sampled request gets its row of logits
        best = greedy_tokens(logits) if any(r.params.greedy for r in self.active) else None
        for i, req in enumerate(self.active):
            req.logits, req.greedy_token = (None, best[i]) if req.params.greedy else (logits[i:i + 1], None)

    def _prefill(self, group: list[Request]) -> None:
        """Prefill `group` into the next free slots and make it active. If the group fails (e.g. out of
        memory), each request is tried alone, so that only the one that fails fails."""
        try:
            logits = self.backend.prefill([len(self.active) + i for i in range(len(group))],
                                          [r.prompt_ids for r in group])
        except Exception as err:
            if len(group) == 1:
                self.fail(group[0], err)
            else:
                for req in group:
                    self._prefill([req])
            return
        for i, req in enumerate(group):
            req.slot = len(self.active)
            req.logits, req.greedy_token = logits[i:i + 1], None
            self.active.append(req)

    def fail(self, req: Request, err: BaseException) -> None:
        if not req.done:
            req.error = f"generation failed: {err}"
            req.done = True
            req.put("error", req.error)

    def fail_all(self, err: BaseException) -> None:
        """The batched forward itself failed: no request can go on."""
        for req in self.active:
            self.fail(req, err)
        self.active.clear()

    def close(self, waiting: list[Request]) -> None:
        for req in [*self.active, *waiting]:
            self.finish(req, "stop")

    def _advance_alone(self, req: Request) -> bool:
        try:
            return self._advance(req)
        except Exception as err:
            self.fail(req, err)
            return False

    def _advance(self, req: Request) -> bool:
        """Sample one token for req and stream its text; False when the request is finished."""
        p = req.params
        if p.greedy and req.greedy_token is not None:
            token = req.greedy_token
        else:
            history = torch.tensor([req.ids], device=req.logits.device) if p.repetition_penalty != 1.0 else None
            token = int(sample_next(req.logits, p, req.generator, history)[0])
        if token in self.stop_ids:
            self._emit(req, final=True)  # flush a trailing partial character
            self.finish(req, "stop")
            return False
        req.ids.append(token)
        req.out.append(token)
        self._emit(req, final=False)
        if req.finish_reason:
            return False
        if len(req.out) >= req.budget:
            self._emit(req, final=True)
            self.finish(req, req.finish_reason or "length")
            return False
        return True

    def _emit(self, req: Request, final: bool) -> None:
        """Append newly printable text and hand out what no stop string can still claim."""
        req.text += req.detokenizer.add(req.out, final)
        stops = req.params.stop
        stop_at = find_stop(req.text, stops, req.emitted)
        if stop_at is not None:
            req.text = req.text[:stop_at]
            self.finish(req, "stop")
            return
        safe = len(req.text) if final else hold_back_stop_prefix(req.text, stops, req.emitted)
        if safe > req.emitted:
            req.put("text", req.text[req.emitted:safe])
            req.emitted = safe

    def finish(self, req: Request, reason: str) -> None:
        if req.done:
            return
        req.done = True
        if req.finish_reason is None:
            req.finish_reason = reason
        if len(req.text) > req.emitted:
            req.put("text", req.text[req.emitted:])
            req.emitted = len(req.text)
        req.put("done", req.finish_reason)

    def _retire(self, req: Request) -> None:
        """Free req's slot at once, moving the last active request into it so slots stay 0..n-1."""
        self.finish(req, "stop")  # no-op unless cancelled or failed
        last = self.active[-1]
        if last is not req:
            self.backend.move(last.slot, req.slot, len(last.ids))
            last.slot = req.slot
            self.active[req.slot] = last
        self.active.pop()
