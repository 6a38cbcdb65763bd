"""chatforge's engine as an lm-evaluation-harness model (registered as "chatforge" once imported).

lm-eval asks three things of a model; all three run on the engine's thread, batched:
- `loglikelihood`: log P(continuation | context) and whether greedy decoding would produce it; each
  shared context runs once and the LM head only where a token is scored (`scoring.py`);
- `loglikelihood_rolling`: perplexity over whole documents, as lm-eval's disjoint rolling windows;
- `generate_until`: every request goes to the engine at once, so continuous batching keeps all its
  slots busy, instead of padded batches that wait for their longest member.
Tokenization, truncation, windows and stop handling are lm-eval's own helpers, so the scores equal the
`hf` model's (tests/test_eval.py).
"""

from __future__ import annotations

import collections

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
    resolve_max_length,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from chatforge.engine import Engine, EngineBusy, SamplingParams
from chatforge.eval.scoring import loglikelihoods
from chatforge.train.speedups import fuse_gelu


@register_model("chatforge")
class ChatforgeLM(TemplateLM):
    """An lm-eval model over a chatforge Engine (any local Hugging Face causal LM directory)."""

    def __init__(self, pretrained: str, device: str | None = None, dtype: str = "auto", batch_size: int = 64,
                 max_length: int | None = None, engine: Engine | None = None, **_ignored) -> None:
        super().__init__()
        self.batch_size = 64 if str(batch_size).startswith("auto") else int(batch_size)  # lm-eval passes strings
        self.engine = engine or Engine(pretrained, device=device, dtype=dtype, max_batch=min(self.batch_size, 64))
        self.tokenizer = self.engine.tokenizer
        # GPT-2's op-by-op tanh GELU as one kernel (the training speed switch): -12% scoring time, within
        # 6e-5 nats (bench/README.md); the engine's own decode path never used the module
        self.engine.call(fuse_gelu)
        config = self.engine.model.config
        self._max_length = int(max_length) if max_length else resolve_max_length(config, self.tokenizer, default=2048)
        self.pretrained = pretrained

    # ------------------------------------------------------------ what lm-eval reads

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        ids = self.tokenizer.encode(string, **kw)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def close(self) -> None:
        self.engine.close()

    # ------------------------------------------------------------ scoring

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=True)  # no progress bar per task: one line per model

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids) -> (logprob, is_greedy)."""
        # a whitespace-only context encodes to nothing: condition on the prefix token, as for an empty one
        answers = loglikelihoods(self.engine.call, [(ctx or [self.prefix_token_id], cont) for _, ctx, cont in requests],
                                 self.max_length, self.batch_size)
        for (request, _, _), answer in zip(requests, answers):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, pred))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        jobs = []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = kwargs.pop("max_gen_toks")
            # as lm-eval: the prompt keeps room to generate; where the task's budget leaves less than half the
            # window (the `hf` model asserts at none), the prompt keeps half and the generation gets the rest
            room = max(self.max_length - max_gen, self.max_length // 2)
            prompt = self.tok_encode(context, left_truncate_len=room)
            sample = bool(kwargs.get("do_sample"))
            params = SamplingParams(max_new_tokens=max_gen, stop=until,
                                    temperature=float(kwargs.get("temperature", 0.0)) if sample else 0.0,
                                    top_p=float(kwargs.get("top_p") or 1.0), top_k=int(kwargs.get("top_k") or 0),
                                    seed=1234 if sample else None)
            jobs.append((prompt, params, until))
        texts = [postprocess_generated_text(text, until, None)
                 for text, (_, _, until) in zip(generate_all(self.engine, [j[:2] for j in jobs]), jobs)]
        for req, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return texts


def generate_all(engine: Engine, jobs: list[tuple[list[int], SamplingParams]]) -> list[str]:
    """Every (prompt, params) through the engine at once, up to its queue, so that continuous batching
    keeps all its slots busy; the texts in order."""
    texts: list[str] = [""] * len(jobs)
    pending = collections.deque(enumerate(jobs))
    running: collections.deque = collections.deque()
    while pending or running:
        while pending:
            i, (prompt, params) = pending[0]
            try:
                running.append((i, engine.submit(prompt, params)))
            except EngineBusy:
                break
            pending.popleft()
        i, req = running.popleft()
        texts[i] = "".join(req)
    return texts
