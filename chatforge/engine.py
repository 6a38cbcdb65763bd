"""Stage 6: text generation with a KV cache, shared by `generate`, `chat` and `serve`.

`Engine.stream()` prefills the prompt once, then decodes one token per step reusing the cache, and
yields text as soon as it is printable (a Chinese character split over two byte-level tokens is held
back until complete). Sampling: temperature (0 = greedy), top-k, top-p, repetition penalty, seed;
stops at the model's end tokens (<|im_end|>, <|endoftext|>) or a stop string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from chatforge.errors import ChatforgeError


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 0            # 0 = off
    top_p: float = 1.0        # 1 = off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ChatforgeError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise ChatforgeError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ChatforgeError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ChatforgeError("top_k must be >= 0")
        if self.repetition_penalty <= 0:
            raise ChatforgeError("repetition_penalty must be > 0")


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                history: torch.Tensor | None = None) -> torch.Tensor:
    """Pick the next token id for each row of `logits` [B, V] (fp32)."""
    if params.repetition_penalty != 1.0 and history is not None and history.numel():
        seen = logits.gather(-1, history)
        seen = torch.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
        logits = logits.scatter(-1, history, seen)
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > params.top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Engine:
    """A loaded model + tokenizer that turns prompts into streamed text."""

    def __init__(self, model_dir: str, device: str | None = None, dtype: torch.dtype | None = None):
        from chatforge.modeling import context_length, load_model
        from chatforge.tokenizer import load_tokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None:
            dtype = torch.bfloat16 if self.device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        self.tokenizer = load_tokenizer(model_dir)
        self.model = load_model(model_dir, dtype=dtype).to(self.device).eval()
        self.context_length = context_length(self.model.config)
        self.stop_ids = self._stop_ids()
        self.finish_reason: str | None = None
        self.completion_tokens = 0

    def _stop_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        vocab = self.tokenizer.get_vocab()
        ids |= {vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab}
        return ids

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=True)["input_ids"])

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    @torch.inference_mode()
    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[str]:
        """Yield the completion's text piece by piece; afterwards `finish_reason` is "stop" or "length"."""
        params.validate()
        if not prompt_ids:
            raise ChatforgeError("the prompt is empty")
        if len(prompt_ids) >= self.context_length:
            raise ChatforgeError(f"the prompt is {len(prompt_ids)} tokens; the context window is {self.context_length}")
        budget = min(params.max_new_tokens, self.context_length - len(prompt_ids))
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        ids = torch.tensor([prompt_ids], device=self.device)
        out = self.model(input_ids=ids, use_cache=True)
        cache = out.cache
        logits = out.logits[:, -1].float()
        generated: list[int] = []
        emitted = ""
        text = ""
        self.finish_reason = "length"
        for _ in range(budget):
            history = torch.tensor([prompt_ids + generated], device=self.device) if params.repetition_penalty != 1.0 else None
            token = int(sample_next(logits, params, generator, history)[0])
            if token in self.stop_ids:
                self.finish_reason = "stop"
                break
            generated.append(token)
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            stop_at = _find_stop(text, params.stop, len(emitted))
            if stop_at is not None:
                text = text[:stop_at]
                self.finish_reason = "stop"
                break
            if not text.endswith("\ufffd"):  # hold back half a character
                safe = _hold_back_stop_prefix(text, params.stop, len(emitted))
                if safe > len(emitted):
                    yield text[len(emitted):safe]
                    emitted = text[:safe]
            out = self.model(input_ids=torch.tensor([[token]], device=self.device), cache=cache, use_cache=True)
            cache = out.cache
            logits = out.logits[:, -1].float()
        if len(text) > len(emitted):
            yield text[len(emitted):]
        self.completion_tokens = len(generated)

    def complete(self, prompt_ids: list[int], params: SamplingParams) -> str:
        return "".join(self.stream(prompt_ids, params))


def _find_stop(text: str, stops: list[str], start: int) -> int | None:
    """Index where the earliest stop string begins, searching text that may contain a new match."""
    hits = [i for s in stops if s for i in [text.find(s, max(0, start - len(s) + 1))] if i >= 0]
    return min(hits) if hits else None


def _hold_back_stop_prefix(text: str, stops: list[str], emitted: int) -> int:
    """How far text may be emitted without showing the beginning of a stop string still being written."""
    safe = len(text)
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                safe = min(safe, len(text) - k)
                break
    return max(safe, emitted)
