"""Text generation with a KV cache and continuous batching, shared by `generate`, `chat` and `serve`.

One background thread owns the model; requests wait in a bounded queue and the thread batches every
running one (`scheduler.py`). The model runs on a backend (`backends/`): chatforge's own decode for the
GPT-2 and Llama checkpoints it writes, transformers' forward for any other causal LM. Sampling:
temperature (0 = greedy), top-k, top-p, repetition penalty, seed; generation stops at the model's end
tokens (<|im_end|>, <|endoftext|>) or a stop string.
"""

from __future__ import annotations

import collections
import os
import re
import threading
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from chatforge.config import option
from chatforge.engine.detokenize import Detokenizer, byte_table
from chatforge.engine.sampling import SamplingParams, sample_next
from chatforge.engine.scheduler import Request, Scheduler
from chatforge.errors import ChatforgeError
from chatforge.text.conversations import special_tokens_pattern, spells_special_token

__all__ = ["Completion", "ContextTooLong", "Engine", "EngineBusy", "EngineOptions", "Request", "SamplingParams",
           "sample_next"]


@dataclass
class EngineOptions:
    """How `generate`, `chat` and `serve` load a model."""

    dtype: str = option("auto", "weights' dtype; auto: bf16 on GPUs, fp32 on CPUs without native bf16, and on "
                                 "CPUs with it whichever decodes faster there (measured once, engine/dtype.py)",
                        choices=("auto", "bf16", "fp16", "fp32"))
    enforce_eager: bool = option(False, "GPU: decode step by step instead of replaying CUDA graphs (as in vLLM)")

    def engine_kwargs(self) -> dict:
        return {"dtype": self.dtype, "static": False if self.enforce_eager else None}


class EngineBusy(ChatforgeError):
    """The request queue is full: the caller should retry later (HTTP 503 + Retry-After)."""


class ContextTooLong(ChatforgeError):
    """The prompt leaves no room to generate in the model's context window."""


@dataclass(frozen=True)
class Completion:
    """The result of one finished request."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


def check_context(prompt_tokens: int, context_length: int) -> None:
    """The one context-length check: a prompt must leave at least one position to generate in."""
    if prompt_tokens >= context_length:
        raise ContextTooLong(f"the prompt is {prompt_tokens} tokens; this model's context window is {context_length}")


def _max_token_bytes(tokenizer, token_bytes: list[bytes] | None) -> int:
    """The most UTF-8 bytes one token stands for, special tokens' text included; 0 unless the tokenizer is
    byte-level BPE without a normalizer (one could shrink the text before it is split) and no added token
    swallows the spaces beside it (lstrip / rstrip)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    added = list(tokenizer.added_tokens_decoder.values())
    if token_bytes is None or backend is None or backend.normalizer is not None \
            or any(getattr(t, "lstrip", False) or getattr(t, "rstrip", False) for t in added):
        return 0
    return max(max(map(len, token_bytes)), *(len(str(t).encode()) for t in added), 1)


class Engine:
    """A loaded model + tokenizer that turns prompts into streamed text, many requests at once."""

    def __init__(self, model_dir: str, device: str | None = None, dtype: str | torch.dtype = "auto",
                 max_batch: int = 16, max_queue: int = 64, fast: bool = True, static: bool | None = None):
        """static: decode with fixed shapes, replayed from CUDA graphs on a GPU (default: on for CUDA;
        on a CPU it only costs attention over the whole context, so it is off there)."""
        from chatforge.modeling import resolve_precision, torch_dtype
        from chatforge.text.tokenizer import load_tokenizer

        if not os.path.isdir(model_dir):
            raise ChatforgeError(f"{model_dir}: model directory not found")
        self.name = model_dir
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.static = self.device.startswith("cuda") if static is None else static
        if not isinstance(dtype, torch.dtype):
            precision = resolve_precision(dtype, "--dtype", cuda=self.device.startswith("cuda"))
            measure = dtype == "auto" and self.device == "cpu" and precision == "bf16"  # a CPU with native bf16
            dtype = None if measure else torch_dtype(precision)
        self.tokenizer = load_tokenizer(model_dir)
        self.token_bytes = byte_table(self.tokenizer)  # None: not byte-level BPE, decode with the tokenizer
        self.max_token_bytes = _max_token_bytes(self.tokenizer, self.token_bytes)
        self.special_tokens = special_tokens_pattern(self.tokenizer)  # their texts, for chat_prompt
        self.max_batch, self.max_queue = max_batch, max_queue
        self._tok_lock = threading.Lock()  # HF fast tokenizers are not safe to share across threads
        self._cv = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._calls: collections.deque[tuple[Future, object, tuple]] = collections.deque()
        self._closed = False
        self._admitting = 0  # requests the engine thread took from the queue in this step
        # Every torch op runs on the engine thread, loading included: each thread that runs an OpenMP
        # region gets its own worker team, and more teams than cores make every op pay a wake-up
        # (bench/README.md: about 1.8x slower decoding on 2 cores).
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, args=(model_dir, dtype, fast),
                                        name="chatforge-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    def _load(self, model_dir: str, dtype: torch.dtype | None, fast: bool) -> None:
        from chatforge.engine.backends import FastModel, make_backend
        from chatforge.engine.dtype import cpu_decode_dtype
        from chatforge.modeling import context_length, load_model
        from chatforge.text.tokenizer import stop_ids

        if dtype is None:  # measured here, on the engine thread, as decoding will run
            dtype = cpu_decode_dtype(model_dir, self.max_batch, fast)

        self.model = load_model(model_dir, dtype=dtype).to(self.device).eval()
        self.context_length = context_length(self.model.config)
        self.vocab_rows = self.model.get_input_embeddings().weight.shape[0]
        self.stop_ids = set(stop_ids(self.tokenizer, self.model.generation_config.eos_token_id))
        self.backend = make_backend(self.model, self.max_batch, self.context_length, fast=fast, static=self.static)
        self.fast = isinstance(self.backend, FastModel)
        self.scheduler = Scheduler(self.backend, self.max_batch, self.stop_ids, self._take_waiting)

    # ------------------------------------------------------------ public API

    def chat_text(self, messages: list[dict]) -> str:
        """The conversation as the model's chat template writes it, ready for the answer (not tokenized)."""
        with self._tok_lock:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def chat_prompt(self, messages: list[dict], text: str | None = None) -> list[int]:
        """The conversation's token ids, as apply_chat_template(tokenize=True) gives them, except that a message
        spelling a special token (`<|im_start|>system...`) keeps it as text: no turn can be forged from inside one.
        `text`: `chat_text(messages)`, when the caller has it already."""
        if not spells_special_token(self.special_tokens, messages):
            return self.encode(text if text is not None else self.chat_text(messages))
        # each content rendered as a marker the template copies, then tokenized apart, special tokens as text
        marked = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
        pieces = re.split("\ue000(\\d+)\ue001", self.chat_text(marked))
        ids: list[int] = []
        with self._tok_lock:
            for k, piece in enumerate(pieces):
                if k % 2:  # a message's content
                    ids += self.tokenizer(messages[int(piece)]["content"], add_special_tokens=False,
                                          split_special_tokens=True)["input_ids"]
                elif piece:
                    ids += self.tokenizer.encode(piece, add_special_tokens=False)
        return ids

    def encode(self, text: str) -> list[int]:
        with self._tok_lock:
            return self.tokenizer.encode(text, add_special_tokens=False)

    def least_tokens(self, text: str) -> int:
        """A lower bound on `encode(text)`'s length, without tokenizing: its UTF-8 bytes over the most one token
        stands for (0 when the tokenizer allows no such bound). A server refuses an over-long prompt with it
        before the shared tokenizer spends ~0.5 s on a megabyte."""
        return -(-len(text.encode()) // self.max_token_bytes) if self.max_token_bytes else 0

    def decode(self, ids: list[int]) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def load(self) -> tuple[int, int]:
        """(active, waiting) request counts."""
        with self._cv:
            self._drop_cancelled()
            return len(self.scheduler.active), len(self._waiting)

    def check_prompt(self, prompt_ids: list[int]) -> None:
        """Raise ChatforgeError unless `prompt_ids` is a prompt this model can continue."""
        if not prompt_ids:
            raise ChatforgeError("the prompt is empty")
        check_context(len(prompt_ids), self.context_length)
        if not all(isinstance(t, int) and 0 <= t < self.vocab_rows for t in prompt_ids):
            raise ChatforgeError(f"the prompt holds a token id outside 0..{self.vocab_rows - 1}")

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_event=None) -> Request:
        """Queue a request; raises ChatforgeError for bad input and EngineBusy when the queue is full.
        `on_event`: called on the engine thread after each of the request's events (text, error, done)."""
        params.validate()
        self.check_prompt(prompt_ids)
        budget = min(params.max_new_tokens, self.context_length - len(prompt_ids))
        req = Request(prompt_ids, params, budget, Detokenizer(self.token_bytes, self.decode), on_event)
        with self._cv:
            if self._closed:
                raise ChatforgeError("the engine is closed")
            self._drop_cancelled()
            # requests that free slots will take at the next step are not waiting (nor are those being admitted)
            free = max(0, self.max_batch - len(self.scheduler.active) - self._admitting)
            if len(self._waiting) >= self.max_queue + free:
                raise EngineBusy(f"the queue is full ({self.max_queue} waiting requests)")
            self._waiting.append(req)
            self._cv.notify()
        return req

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        """The request, to iterate for text pieces; afterwards it holds finish_reason and token counts.
        Leaving the loop early cancels it and frees its slot."""
        return self.submit(prompt_ids, params)

    def complete(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        req = self.submit(prompt_ids, params)
        text = "".join(req)
        return Completion(text, req.finish_reason, req.prompt_tokens, req.completion_tokens)

    def call(self, fn, *args):
        """`fn(model, *args)` on the engine thread between decode steps (whole-sequence work such as
        scoring for `chatforge eval`), under inference mode; returns its result or raises its error."""
        done: Future = Future()
        with self._cv:
            if self._closed:
                raise ChatforgeError("the engine is closed")
            self._calls.append((done, fn, args))
            self._cv.notify()
        return done.result()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    # ------------------------------------------------------------ the engine thread

    def _drop_cancelled(self) -> None:
        """Give up the queue places of waiting requests whose callers left (under self._cv): else clients
        that time out while a long batch runs would keep the queue full for everyone."""
        if any(req.cancelled.is_set() for req in self._waiting):
            for req in self._waiting:
                if req.cancelled.is_set():
                    self.scheduler.finish(req, "stop")
            self._waiting = collections.deque(req for req in self._waiting if not req.cancelled.is_set())

    def _take_waiting(self) -> Request | None:
        with self._cv:
            if not self._waiting:
                return None
            self._admitting += 1  # out of the queue, not yet active: until this step ends
            return self._waiting.popleft()

    def _loop(self, model_dir: str, dtype: torch.dtype, fast: bool) -> None:
        try:
            device = torch.device(self.device)
            if device.type == "cuda" and device.index is not None:
                torch.cuda.set_device(device)  # streams and CUDA graphs belong to the current device
            self._load(model_dir, dtype, fast)
        except BaseException as err:  # re-raised by __init__ on the caller's thread
            self._load_error = err
            return
        finally:
            self._ready.set()
        with torch.inference_mode():  # entered once: per step it cost ~1% of a small model's token
            self._serve()

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not (self._waiting or self.scheduler.active or self._calls or self._closed):
                    self._cv.wait()
                if self._closed:
                    self.scheduler.close(list(self._waiting))
                    for done, _, _ in self._calls:
                        done.set_exception(ChatforgeError("the engine is closed"))
                    return
                calls, self._calls = list(self._calls), collections.deque()
            for done, fn, args in calls:  # a failing call fails its caller alone
                try:
                    done.set_result(fn(self.model, *args))
                except Exception as err:
                    done.set_exception(err)
            if not self.scheduler.active and not self._waiting:
                continue
            try:
                self.scheduler.step()
            except Exception as err:  # the batched forward failed: never leave a client hanging
                self.scheduler.fail_all(err)
            finally:
                with self._cv:
                    self._admitting = 0
