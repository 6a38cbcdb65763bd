"""Stage 6: text generation with a KV cache and continuous batching, shared by `generate`, `chat` and `serve`.

One background thread owns the model. Requests wait in a bounded queue; between decode steps the
thread admits waiting requests (prefill), then decodes one token for every active request in one batch,
and retires finished or cancelled ones at once (continuous batching). Text reaches the caller as soon as
it is printable (a character split over two byte-level tokens is held back until complete).

Speed: for the GPT-2 and Llama checkpoints chatforge writes, `_FastModel` runs its own forward over the
Hugging Face weights with a preallocated KV cache. Why: at the sizes chatforge trains on a CPU, HF's
forward and `generate()` spend far longer in Python per step (cache objects, mask building, logits
processors) than in matmuls. On CPUs with native bf16 the weights are bf16 by default and pre-packed for
oneDNN (attention stays fp32), and every torch op runs on the engine thread (see `Engine.__init__`). On a
GPU the decode step has fixed shapes and is replayed from CUDA graphs recorded at load time (see
`_FastModel._decode_static`; `static=False` / `--enforce-eager` turns it off).
Any other causal LM goes through `_HFModel` (the stock forward, one request at a time inside each step:
slower, but it works). Greedy output equals `model.generate()` (tested).
Sampling: temperature (0 = greedy), top-k, top-p, repetition penalty, seed; stops at the model's end
tokens (<|im_end|>, <|endoftext|>) or a stop string.
"""

from __future__ import annotations

import codecs
import collections
import queue
import threading
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from chatforge.errors import ChatforgeError


class EngineBusy(ChatforgeError):
    """The request queue is full: the caller should retry later (HTTP 503 + Retry-After)."""


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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 and self.repetition_penalty == 1.0


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
    if generator is not None and generator.device != probs.device:  # a seeded request's generator is on
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(probs.device)  # the CPU
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------- model backends
# Both keep one KV cache per slot; active requests always occupy slots 0..n-1 (see Engine._retire).


class _FastModel:
    """GPT-2 / Llama forward over the HF weights with a static KV cache [slot, head, position, dim]."""

    def __init__(self, model, max_batch: int, ctx: int, static: bool = False):
        cfg = model.config
        self.model, self.arch = model, cfg.model_type
        p = next(model.parameters())
        if self.arch == "gpt2":
            self.layers = model.transformer.h
            self.n_head = self.n_kv = cfg.n_head
            self.head_dim = cfg.n_embd // cfg.n_head
            self.scale = self.head_dim ** -0.5 if cfg.scale_attn_weights else 1.0
        else:
            self.layers = model.model.layers
            self.n_head, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
            self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            self.scale = self.head_dim ** -0.5
            rot = model.model.rotary_emb  # same table as HF: cos/sin of position * inv_freq, times scaling
            freqs = torch.arange(ctx, device=p.device).float()[:, None] * rot.inv_freq.float()[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            self.cos = (emb.cos() * rot.attention_scaling).to(p.dtype)
            self.sin = (emb.sin() * rot.attention_scaling).to(p.dtype)
        # one slot to start; grows (doubling, up to max_batch) the first time more requests run at once.
        # The static step needs every slot from the start: its tensors' addresses must never change.
        self.max_batch, self.static = max_batch, static
        shape = (max_batch if static else 1, self.n_kv, ctx, self.head_dim)
        # bf16 weights on a CPU still attend in fp32: oneDNN's bf16 bmm at one query row is ~7x slower
        # than fp32 (measured: 166 vs 23 us per call, 6x384 model), and the cache is small
        self.cache_dtype = torch.float32 if p.device.type == "cpu" else p.dtype
        self.k = [torch.zeros(shape, dtype=self.cache_dtype, device=p.device) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=self.cache_dtype, device=p.device) for _ in self.layers]
        self.device = p.device
        self._bind_weights(model)
        if static:  # the static step's inputs: token ids and positions, padded to a bucket of slots
            self._inputs = torch.zeros((2, max_batch), dtype=torch.long, device=p.device)
            self._slots = torch.arange(max_batch, device=p.device)
            self._span = torch.arange(ctx, device=p.device)
            self.buckets = sorted({min(2 ** i, max_batch) for i in range(max_batch.bit_length() + 1)})
            self._graphs: dict[int, tuple] | None = None
            if p.device.type == "cuda":
                self._capture_graphs()

    @staticmethod
    def supports(model) -> bool:
        cfg = model.config
        if cfg.model_type == "gpt2":
            return not (cfg.scale_attn_by_inverse_layer_idx or cfg.reorder_and_upcast_attn)
        if cfg.model_type == "llama":
            rope = getattr(cfg, "rope_parameters", None) or {}
            return (rope.get("rope_type", "default") == "default" and not getattr(cfg, "attention_bias", False)
                    and not getattr(cfg, "mlp_bias", False))
        return False

    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        cap = self.k[0].shape[0]
        if slot >= cap:
            grow = min(self.max_batch, max(slot + 1, 2 * cap)) - cap
            self.k = [torch.cat([t, t.new_zeros((grow, *t.shape[1:]))]) for t in self.k]
            self.v = [torch.cat([t, t.new_zeros((grow, *t.shape[1:]))]) for t in self.v]
        return self._prefill(ids, slot)[0]

    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One new token per slot 0..B-1, each at its own position; returns logits [B, V].

        Dynamic shapes (eager): attention reads only the positions written so far. Written for few
        Python-level ops per layer (2-D activations, fused QKV, GQA by reshaping, no transposes): at
        these model sizes the step time is mostly per-op overhead, not FLOPs."""
        if self.static:
            return self._decode_static(tokens, positions)
        B, dev = len(tokens), self.device
        x = torch.tensor(tokens, device=dev)
        pos = torch.tensor(positions, device=dev)
        span = max(positions) + 1
        mask = None
        if B > 1:  # rows at different lengths: hide each row's unused tail
            mask = (torch.arange(span, device=dev)[None, :] > pos[:, None])[:, None, None, :]
        rows = torch.arange(B, device=dev)
        H, G, D = self.n_head, self.n_kv, self.head_dim

        def attend(i: int, q, k, v):
            kc, vc = self.k[i], self.v[i]
            if B == 1:
                kc[0, :, positions[0]] = k[0]
                vc[0, :, positions[0]] = v[0]
            else:
                kc[rows, :, pos] = k.to(kc.dtype)
                vc[rows, :, pos] = v.to(vc.dtype)
            keys, values = kc[:B, :, :span], vc[:B, :, :span]      # [B, G, T, D]
            att = (q.view(B, G, H // G, D).to(kc.dtype) * self.scale) @ keys.transpose(-1, -2)  # [B, G, H/G, T]
            if mask is not None:
                att = att.masked_fill(mask, float("-inf"))
            return (att.softmax(-1) @ values).view(B, H * D)

        return self._step(x, pos, attend)

    def _decode_static(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """`decode` with fixed shapes, so that a GPU can replay it from a CUDA graph: the batch padded to
        a bucket (1, 2, 4, ...), attention over the whole cache with a mask. Padding rows write into free
        slots, which the next prefill of those slots overwrites and no mask ever exposes.

        Why: on a GPU a small model's eager step is kernel launches and Python, not FLOPs (the anchors:
        `generate()` at 161 tokens/s for GPT-2 124M on an H200, against a ~19,000 bandwidth limit); a
        graph replays the step's hundreds of kernels with one launch."""
        B = len(tokens)
        bucket = next(b for b in self.buckets if b >= B)
        pad = [0] * (bucket - B)
        self._inputs[:, :bucket].copy_(torch.tensor([tokens + pad, positions + pad]))
        if self._graphs is not None:
            graph, logits = self._graphs[bucket]
            graph.replay()
            return logits[:B].clone()  # the graphs share a memory pool: the next replay may reuse this buffer
        return self._static_step(bucket)[:B]

    def _static_step(self, bucket: int) -> torch.Tensor:
        x, pos = self._inputs[0, :bucket], self._inputs[1, :bucket]
        rows = self._slots[:bucket]
        visible = (self._span[None, :] <= pos[:, None])[:, None, None, :]  # [bucket, 1, 1, ctx]

        def attend(i: int, q, k, v):
            kc, vc = self.k[i], self.v[i]
            kc[rows, :, pos] = k.to(kc.dtype)
            vc[rows, :, pos] = v.to(vc.dtype)
            o = F.scaled_dot_product_attention(q[:, :, None].to(kc.dtype), kc[:bucket], vc[:bucket],
                                               attn_mask=visible, scale=self.scale,
                                               enable_gqa=self.n_kv != self.n_head)
            return o.reshape(bucket, self.n_head * self.head_dim)

        return self._step(x, pos, attend)

    def _capture_graphs(self) -> None:
        """Record the static step of every bucket as a CUDA graph, at load time (a failure shows before
        any request runs), largest first so that the smaller graphs reuse its memory pool. Warm-up runs
        first, on a side stream, as torch.cuda.graphs requires; with no request yet, its cache writes
        land in free slots. On any failure, decoding goes on without graphs (the same step, eagerly)."""
        import warnings

        main, side, pool = torch.cuda.current_stream(), torch.cuda.Stream(), torch.cuda.graph_pool_handle()
        graphs = {}
        try:
            with torch.inference_mode():
                for bucket in reversed(self.buckets):
                    side.wait_stream(main)
                    try:
                        with torch.cuda.stream(side):
                            for _ in range(2):
                                self._static_step(bucket)
                    finally:
                        main.wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        logits = self._static_step(bucket)
                    graphs[bucket] = (graph, logits)
            self._graphs = graphs
        except Exception as err:  # a capture that raised leaves the capture stream current and the pool open
            torch.cuda.set_stream(main)
            try:
                torch._C._cuda_endAllocateToPool(self.device.index or 0, pool)
            except (AttributeError, RuntimeError):
                pass
            torch.cuda.synchronize()
            warnings.warn(f"CUDA graph capture failed, decoding without graphs: {err}")

    def _step(self, x: torch.Tensor, pos: torch.Tensor, attend) -> torch.Tensor:
        """The layer stack for one token per row; `attend(layer, q, k, v)` stores k/v in the cache and
        returns the attention output [rows, H*D]."""
        B, H, G, D = x.shape[0], self.n_head, self.n_kv, self.head_dim
        if self.arch == "gpt2":
            h = F.embedding(x, self.wte) + F.embedding(pos, self.wpe)
        else:
            h = F.embedding(x, self.wte)
            cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # [B, 1, D]
        for i, w in enumerate(self.weights):
            if self.arch == "gpt2":
                a = F.layer_norm(h, h.shape[-1:], w["ln1_w"], w["ln1_b"], self.eps)
                qkv = self.linear(a, w["qkv_w"], w["qkv_b"])
            else:
                a = self._rms(h, w["ln1_w"])
                qkv = self.linear(a, w["qkv_w"])
            q, k, v = qkv.view(B, H + 2 * G, D).split([H, G, G], dim=1)
            if self.arch != "gpt2":
                q = q * cos + _rotate_half(q) * sin
                k = k * cos + _rotate_half(k) * sin
            o = attend(i, q, k, v).to(h.dtype)
            if self.arch == "gpt2":
                h = self.linear(o, w["proj_w"], w["proj_b"], residual=h)
                a = F.layer_norm(h, h.shape[-1:], w["ln2_w"], w["ln2_b"], self.eps)
                a = self.linear(a, w["fc_w"], w["fc_b"], activate=True)
                h = self.linear(a, w["out_w"], w["out_b"], residual=h)
            else:
                h = self.linear(o, w["proj_w"], residual=h)
                a = self._rms(h, w["ln2_w"])
                gu = self.linear(a, w["gate_up_w"])
                g, u = gu.chunk(2, dim=-1)
                h = self.linear(self.act(g) * u, w["down_w"], residual=h)
        if self.arch == "gpt2":
            h = F.layer_norm(h, h.shape[-1:], self.lnf_w, self.lnf_b, self.eps)
        else:
            h = self._rms(h, self.lnf_w)
        return self.linear(h, self.head_w).float()

    def _rms(self, h, weight):
        hf = h.float()
        return weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + self.eps)).to(h.dtype)

    def _bind_weights(self, model) -> None:
        """Tensors laid out for `x @ W` (transposed once here), QKV and gate/up fused; on a bf16 CPU,
        copies packed for oneDNN instead (see `linear`)."""
        cfg, t = model.config, lambda lin: lin.weight.detach().t().contiguous()
        self.weights = []
        if self.arch == "gpt2":
            tr = model.transformer
            self.eps, self.act = cfg.layer_norm_epsilon, _gelu(cfg.activation_function)
            self.tanh_gelu = cfg.activation_function in TANH_GELU
            self.wte, self.wpe = tr.wte.weight, tr.wpe.weight
            self.lnf_w, self.lnf_b = tr.ln_f.weight, tr.ln_f.bias
            for L in tr.h:  # GPT-2's Conv1D already stores [in, out]
                self.weights.append(dict(
                    ln1_w=L.ln_1.weight, ln1_b=L.ln_1.bias, qkv_w=L.attn.c_attn.weight, qkv_b=L.attn.c_attn.bias,
                    proj_w=L.attn.c_proj.weight, proj_b=L.attn.c_proj.bias, ln2_w=L.ln_2.weight,
                    ln2_b=L.ln_2.bias, fc_w=L.mlp.c_fc.weight, fc_b=L.mlp.c_fc.bias,
                    out_w=L.mlp.c_proj.weight, out_b=L.mlp.c_proj.bias))
        else:
            from transformers.activations import ACT2FN

            self.eps, self.act = cfg.rms_norm_eps, ACT2FN[cfg.hidden_act]
            self.tanh_gelu = False
            self.wte, self.lnf_w = model.model.embed_tokens.weight, model.model.norm.weight
            for L in model.model.layers:
                at, mlp = L.self_attn, L.mlp
                self.weights.append(dict(
                    ln1_w=L.input_layernorm.weight, ln2_w=L.post_attention_layernorm.weight,
                    qkv_w=torch.cat([t(at.q_proj), t(at.k_proj), t(at.v_proj)], dim=1), proj_w=t(at.o_proj),
                    gate_up_w=torch.cat([t(mlp.gate_proj), t(mlp.up_proj)], dim=1), down_w=t(mlp.down_proj)))
        self.head_w = t(model.lm_head)
        self.packed = _can_pack(self.head_w)
        if self.packed:  # oneDNN's own blocked layout: the decode matmuls read it ~2x faster (see _can_pack)
            pack = lambda w: torch.ops.mkldnn._reorder_linear_weight(w.detach().t().contiguous(), 1)  # noqa: E731
            self.weights = [{k: pack(v) if k.endswith("_w") and v.dim() == 2 else v for k, v in w.items()}
                            for w in self.weights]
            self.head_w = pack(self.head_w)

    def linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
               residual: torch.Tensor | None = None, activate: bool = False) -> torch.Tensor:
        """residual + act(x @ W + b) for W from _bind_weights. Packed weights fuse the residual add or a
        tanh GELU into the matmul: fewer ops per layer, which is what a small model's step time is made of."""
        if self.packed:
            if residual is not None:
                return torch.ops.mkldnn._linear_pointwise.binary(x, residual, w, b, "add")
            if activate and self.tanh_gelu:
                return torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "tanh")
            y = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        else:
            y = x @ w if b is None else torch.addmm(b, x, w)
        if activate:
            y = self.act(y)
        return y if residual is None else residual + y

    def move(self, src: int, dst: int, length: int) -> None:
        for k, v in zip(self.k, self.v):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    def _prefill(self, ids: list[int], slot: int) -> torch.Tensor:
        """The whole prompt in one causal pass through the HF modules, its keys/values written to `slot`;
        returns the last position's logits [1, V]."""
        S, gpt2 = len(ids), self.arch == "gpt2"
        x = torch.tensor([ids], device=self.device)
        pos = torch.arange(S, device=self.device)[None]
        if gpt2:
            h = self.model.transformer.wte(x) + self.model.transformer.wpe(pos)
        else:
            h = self.model.model.embed_tokens(x)
            cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # [1, 1, S, D]
        for i, layer in enumerate(self.layers):
            if gpt2:
                a = layer.ln_1(h)
                q, k, v = layer.attn.c_attn(a).split(self.n_head * self.head_dim, dim=2)
            else:
                a = layer.input_layernorm(h)
                q, k, v = layer.self_attn.q_proj(a), layer.self_attn.k_proj(a), layer.self_attn.v_proj(a)
            q = q.view(1, S, self.n_head, self.head_dim).transpose(1, 2)
            k = k.view(1, S, self.n_kv, self.head_dim).transpose(1, 2)
            v = v.view(1, S, self.n_kv, self.head_dim).transpose(1, 2)
            if not gpt2:
                q = q * cos + _rotate_half(q) * sin
                k = k * cos + _rotate_half(k) * sin
            self.k[i][slot, :, :S] = k[0]
            self.v[i][slot, :, :S] = v[0]
            if self.n_kv != self.n_head:
                k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
                v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
            o = o.transpose(1, 2).reshape(1, S, -1)
            if gpt2:
                h = h + layer.attn.c_proj(o)
                h = h + layer.mlp(layer.ln_2(h))
            else:
                h = h + layer.self_attn.o_proj(o)
                h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = self.model.transformer.ln_f(h[:, -1]) if gpt2 else self.model.model.norm(h[:, -1])
        return self.model.lm_head(h).float()


def _can_pack(weight: torch.Tensor) -> bool:
    """bf16 weights on a CPU with oneDNN: decode with weights pre-packed into oneDNN's blocked layout
    (what torch.compile's CPU freezing does). Measured, 2 cores, a 384x1536 bf16 matmul: 26 vs 53 us at
    1 row, 42 vs 69 us at 8 rows, 107 vs 135 us at 32, bit-identical results. These ops are PyTorch
    internals, so any failure here (another PyTorch build) falls back to plain matmuls. fp32 stays
    unpacked: MKL's packed path rounds differently, and greedy output must equal generate()'s."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ones(8, 16, dtype=torch.bfloat16)
        x = torch.ones(2, 16, dtype=torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        return bool(torch.equal(torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), x @ w.t()))
    except (AttributeError, RuntimeError):
        return False


TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _gelu(name: str):
    # GPT-2's "gelu_new" is the tanh approximation; one fused op instead of HF's seven
    if name in TANH_GELU:
        return lambda x: F.gelu(x, approximate="tanh")
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class _HFModel:
    """Any transformers causal LM through its own forward and cache: one request at a time per step."""

    def __init__(self, model, max_batch: int, ctx: int):
        self.model = model
        self.device = next(model.parameters()).device
        self.caches: list = [None] * max_batch

    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True, logits_to_keep=1)
        self.caches[slot] = out.cache
        return out.logits[0, -1].float()

    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        rows = []
        for slot, token in enumerate(tokens):
            out = self.model(input_ids=torch.tensor([[token]], device=self.device), cache=self.caches[slot],
                             use_cache=True, logits_to_keep=1)
            self.caches[slot] = out.cache
            rows.append(out.logits[0, -1].float())
        return torch.stack(rows)

    def move(self, src: int, dst: int, length: int) -> None:
        self.caches[dst], self.caches[src] = self.caches[src], None


# ---------------------------------------------------------------- requests


class Request:
    """One generation: iterate it for text pieces; `finish_reason` ("stop"/"length") is set at the end."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, budget: int):
        self.prompt_ids, self.params, self.budget = list(prompt_ids), params, budget
        self.ids = list(prompt_ids)          # prompt + generated, for positions and repetition penalty
        self.out: list[int] = []             # generated ids
        self.text = ""                       # decoded generated text
        self.emitted = 0                     # characters of text already handed out
        self.prefix_off = self.read_off = 0  # incremental detokenization window (as in vLLM)
        self.prefix_text = ""
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # byte-level fast path
        self.greedy_token: int | None = None  # argmax from the batched step, when greedy
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.done = False
        self.slot = -1
        self.logits: torch.Tensor | None = None
        self.events: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.out)

    def cancel(self) -> None:
        """Stop generating (the engine frees the slot before its next step)."""
        self.cancelled.set()

    def __iter__(self) -> Iterator[str]:
        while True:
            kind, value = self.events.get()
            if kind == "text":
                yield value
            elif kind == "error":
                raise ChatforgeError(value)
            else:
                return


class Engine:
    """A loaded model + tokenizer that turns prompts into streamed text, many requests at once."""

    def __init__(self, model_dir: str, device: str | None = None, dtype: str | torch.dtype = "auto",
                 max_batch: int = 16, max_queue: int = 64, fast: bool = True, static: bool | None = None):
        """static: decode with fixed shapes, replayed from CUDA graphs on a GPU (default: on for CUDA;
        on a CPU it only costs attention over the whole context, so it is off there)."""
        from chatforge.modeling import resolve_precision, torch_dtype
        from chatforge.tokenizer import load_tokenizer

        self.name = model_dir
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.static = self.device.startswith("cuda") if static is None else static
        if not isinstance(dtype, torch.dtype):
            dtype = torch_dtype(resolve_precision(dtype, "--dtype", cuda=self.device.startswith("cuda")))
        self.tokenizer = load_tokenizer(model_dir)
        self.token_bytes = _byte_table(self.tokenizer)  # None: not byte-level BPE, decode with the tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.finish_reason: str | None = None  # of the last stream() call
        self.completion_tokens = 0
        self._tok_lock = threading.Lock()  # HF fast tokenizers are not safe to share across threads
        self._cv = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: list[Request] = []  # index == KV-cache slot
        self._closed = False
        # Every torch op runs on the engine thread, loading included. Why: PyTorch's OpenMP (libgomp)
        # gives each thread that runs a parallel region its own worker team; once the teams' threads
        # outnumber the cores, idle workers sleep instead of spinning and every op pays a wake-up.
        # Measured on 2 cores, tiny preset: batch 1 787 vs 436 tokens/s, batch 32 4,626 vs 2,825, against
        # the same engine while the caller's thread also owns a team (as loading the model there makes).
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, args=(model_dir, dtype, fast),
                                        name="chatforge-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    def _load(self, model_dir: str, dtype: torch.dtype, fast: bool) -> None:
        from chatforge.modeling import context_length, load_model

        self.model = load_model(model_dir, dtype=dtype).to(self.device).eval()
        self.context_length = context_length(self.model.config)
        self.stop_ids = self._stop_ids()
        self.fast = fast and _FastModel.supports(self.model)
        if self.fast:
            self.backend = _FastModel(self.model, self.max_batch, self.context_length, static=self.static)
        else:
            self.backend = _HFModel(self.model, self.max_batch, self.context_length)

    def _stop_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        vocab = self.tokenizer.get_vocab()
        ids |= {vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab}
        return ids

    # ------------------------------------------------------------ public API

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        with self._tok_lock:
            return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                           return_dict=True)["input_ids"])

    def encode(self, text: str) -> list[int]:
        with self._tok_lock:
            return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def load(self) -> tuple[int, int]:
        """(active, waiting) request counts."""
        return len(self._active), len(self._waiting)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        """Queue a request; raises ChatforgeError for bad input and EngineBusy when the queue is full."""
        params.validate()
        if not prompt_ids:
            raise ChatforgeError("the prompt is empty")
        if len(prompt_ids) >= self.context_length:
            raise ChatforgeError(f"the prompt is {len(prompt_ids)} tokens; the context window is "
                                 f"{self.context_length}")
        req = Request(prompt_ids, params, min(params.max_new_tokens, self.context_length - len(prompt_ids)))
        with self._cv:
            if self._closed:
                raise ChatforgeError("the engine is closed")
            if len(self._waiting) >= self.max_queue:
                raise EngineBusy(f"the queue is full ({self.max_queue} waiting requests)")
            self._waiting.append(req)
            self._cv.notify()
        return req

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[str]:
        """Yield the completion's text piece by piece; afterwards `finish_reason` is "stop" or "length"."""
        req = self.submit(prompt_ids, params)
        try:
            yield from req
        finally:
            req.cancel()  # no-op when finished; frees the slot when the caller stops early
            self.finish_reason, self.completion_tokens = req.finish_reason, req.completion_tokens

    def complete(self, prompt_ids: list[int], params: SamplingParams) -> str:
        return "".join(self.stream(prompt_ids, params))

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    # ------------------------------------------------------------ the engine thread

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
        while True:
            with self._cv:
                while not self._waiting and not self._active and not self._closed:
                    self._cv.wait()
                if self._closed:
                    for req in [*self._active, *self._waiting]:
                        self._finish(req, "stop")
                    return
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as err:  # never leave a client hanging: fail what was running, keep serving
                for req in self._active:
                    req.error = f"generation failed: {err}"
                    req.events.put(("error", req.error))
                self._active.clear()

    def _step(self) -> None:
        # 1. admit waiting requests into free slots (prefill)
        while len(self._active) < self.max_batch:
            with self._cv:
                if not self._waiting:
                    break
                req = self._waiting.popleft()
            if req.cancelled.is_set():
                self._finish(req, "stop")
                continue
            req.slot = len(self._active)
            self._active.append(req)
            req.logits = self.backend.prefill(req.slot, req.prompt_ids)[None]
            req.greedy_token = None
        # 2. pick each request's next token; retire finished ones
        done = [r for r in self._active if r.cancelled.is_set() or not self._advance(r)]
        for req in sorted(done, key=lambda r: -r.slot):
            self._retire(req)
        if not self._active:
            return
        # 3. one batched forward for everyone still running
        logits = self.backend.decode([r.ids[-1] for r in self._active], [len(r.ids) - 1 for r in self._active])
        best = logits.argmax(dim=-1).tolist()  # one call for every greedy request in the batch
        for i, req in enumerate(self._active):
            req.logits, req.greedy_token = logits[i:i + 1], best[i]

    def _advance(self, req: Request) -> bool:
        """Sample one token for req and stream its text; False when the request is finished."""
        p = req.params
        if p.greedy and req.greedy_token is not None:
            token = req.greedy_token
        else:
            history = torch.tensor([req.ids], device=req.logits.device) if p.repetition_penalty != 1.0 else None
            token = int(sample_next(req.logits, p, req.generator, history)[0])
        if token in self.stop_ids:
            self._detokenize(req, final=True)  # flush a trailing partial character
            self._finish(req, "stop")
            return False
        req.ids.append(token)
        req.out.append(token)
        self._detokenize(req, final=False)
        if req.finish_reason:
            return False
        if len(req.out) >= req.budget:
            self._detokenize(req, final=True)
            self._finish(req, req.finish_reason or "length")
            return False
        return True

    def _detokenize(self, req: Request, final: bool) -> None:
        """Append newly printable text (decoding only the new tokens) and emit what no stop string can claim."""
        table = self.token_bytes
        if table is not None:  # byte-level BPE: token bytes through an incremental UTF-8 decoder
            new_ids, req.read_off = req.out[req.read_off:], len(req.out)
            req.text += req.utf8.decode(b"".join(table[t] if t < len(table) else b"" for t in new_ids), final)
        else:
            new = self.decode(req.out[req.prefix_off:])
            if len(new) > len(req.prefix_text) and (final or not new.endswith("\ufffd")):
                req.text += new[len(req.prefix_text):]
                req.prefix_off, req.read_off = req.read_off, len(req.out)
                req.prefix_text = self.decode(req.out[req.prefix_off:req.read_off])
        stops = req.params.stop
        stop_at = _find_stop(req.text, stops, req.emitted)
        if stop_at is not None:
            req.text = req.text[:stop_at]
            self._finish(req, "stop")
            return
        safe = len(req.text) if final else _hold_back_stop_prefix(req.text, stops, req.emitted)
        if safe > req.emitted:
            req.events.put(("text", req.text[req.emitted:safe]))
            req.emitted = safe

    def _finish(self, req: Request, reason: str) -> None:
        if req.done:
            return
        req.done = True
        if req.finish_reason is None:
            req.finish_reason = reason
        if len(req.text) > req.emitted:
            req.events.put(("text", req.text[req.emitted:]))
            req.emitted = len(req.text)
        req.events.put(("done", req.finish_reason))

    def _retire(self, req: Request) -> None:
        """Free req's slot at once, moving the last active request into it so slots stay 0..n-1."""
        self._finish(req, "stop")  # no-op unless cancelled
        last = self._active[-1]
        if last is not req:
            self.backend.move(last.slot, req.slot, len(last.ids))
            last.slot = req.slot
            self._active[req.slot] = last
        self._active.pop()


def _byte_table(tok) -> list[bytes] | None:
    """Each token id's bytes for a byte-level BPE tokenizer (special tokens: none), so streaming text costs
    a table lookup per token instead of a tokenizer.decode() call; None for other tokenizers."""
    from tokenizers import decoders

    from chatforge.tokenizer import byte_decoder

    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.decoder, decoders.ByteLevel) \
            or getattr(tok, "clean_up_tokenization_spaces", False):
        return None
    byte_of = byte_decoder()
    vocab = tok.get_vocab()
    special = set(tok.all_special_ids)
    added = set(tok.added_tokens_decoder)
    table = [b""] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        if i in special:
            continue
        if i in added:
            table[i] = token.encode()
            continue
        try:
            table[i] = bytes(byte_of[c] for c in token)
        except KeyError:
            return None
    return table


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
