"""The fast backend: GPT-2 / Llama decoding over the Hugging Face weights, with a preallocated KV cache.

Why our own forward: at the sizes chatforge trains on a CPU, HF's forward and `generate()` spend far
longer in Python per step (cache objects, mask building, logits processors) than in matmuls
(bench/README.md has the figures). On CPUs with native bf16 the weights are bf16 and pre-packed for
oneDNN, and so is the cache. Prompts are prefilled unpadded, back to back, through the same layer code as
the decode step. On a GPU the decode step has fixed shapes and is replayed from CUDA graphs
recorded at load time (`static=False` / `--enforce-eager` turns it off). Greedy output equals
`model.generate()` (tested).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

class FastModel:
    """GPT-2 / Llama forward over the HF weights with a static KV cache per layer [slot, k|v, head, position, dim]
    (keys and values in one tensor: one write per layer, as the QKV matmul leaves them side by side)."""

    def __init__(self, model, max_batch: int, ctx: int, static: bool = False):
        cfg = model.config
        self.arch = cfg.model_type
        p = next(model.parameters())
        if self.arch == "gpt2":
            n_layer = cfg.n_layer
            self.n_head = self.n_kv = cfg.n_head
            self.head_dim = cfg.n_embd // cfg.n_head
            self.scale = self.head_dim ** -0.5 if cfg.scale_attn_weights else 1.0
        else:
            n_layer = cfg.num_hidden_layers
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
        shape = (max_batch if static else 1, 2, self.n_kv, ctx, self.head_dim)
        self.kv = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(n_layer)]
        self.device = p.device
        self._bind_weights(model)
        if static:  # the static step's inputs: token ids and positions, padded to a bucket of slots
            self._inputs = torch.zeros((2, max_batch), dtype=torch.long, device=p.device)
            self._slots = torch.arange(max_batch, device=p.device)
            self._span = torch.arange(ctx, device=p.device)
            self.buckets = sorted({min(2 ** i, max_batch) for i in range(max_batch.bit_length() + 1)})
            # attention reads the cache up to a span bucket (128, 256, ... ctx), not the whole window: at
            # 32 requests the whole 1k window of GPT-2 is ~1.2 GB of keys and values per step
            self.spans = sorted({min(128 * 2 ** i, ctx) for i in range(max(1, ctx // 128).bit_length() + 1)})
            self._graphs: dict[tuple[int, int], tuple] | None = None
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

    def prefill(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        cap = self.kv[0].shape[0]
        if max(slots) >= cap:
            grow = min(self.max_batch, max(max(slots) + 1, 2 * cap)) - cap
            self.kv = [torch.cat([t, t.new_zeros((grow, *t.shape[1:]))]) for t in self.kv]
        return self._prefill(prompts, slots)

    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One new token per slot 0..B-1, each at its own position; returns logits [B, V].

        Dynamic shapes (eager): attention reads only the positions written so far. Written for few
        Python-level ops per layer (2-D activations, fused QKV, GQA by reshaping, no transposes): at
        these model sizes the step time is mostly per-op overhead, not FLOPs."""
        if self.static:
            return self._decode_static(tokens, positions)
        B, dev = len(tokens), self.device
        if B == 1:  # one request (`chatforge chat`): slices of the tables and cache, no index tensors or mask
            t, p = tokens[0], positions[0]

            def attend_one(i: int, q, kv):
                slot = self.kv[i][0]  # [k|v, head, position, dim]
                slot[:, :, p] = kv[0]
                return self._attend_cache(q, slot[None, :, :, :p + 1], None)

            return self._step(slice(t, t + 1), slice(p, p + 1), attend_one)
        x = torch.tensor(tokens, device=dev)
        pos = torch.tensor(positions, device=dev)
        span = max(positions) + 1
        visible = self._visible(torch.arange(span, device=dev), pos)  # rows at different lengths: hide each tail
        rows = torch.arange(B, device=dev)

        def attend(i: int, q, kv):
            cache = self.kv[i]
            cache[rows, :, :, pos] = kv
            return self._attend_cache(q, cache[:B, :, :, :span], visible)

        return self._step(x, pos, attend)

    def _decode_static(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """`decode` with fixed shapes, so that a GPU can replay it from a CUDA graph: the batch padded to
        a bucket (1, 2, 4, ...), attention over the whole cache with a mask. Padding rows write into free
        slots, which the next prefill of those slots overwrites and no mask ever exposes.

        Why: on a GPU a small model's eager step is kernel launches and Python, not FLOPs; a graph
        replays the step's hundreds of kernels with one launch."""
        B = len(tokens)
        bucket = next(b for b in self.buckets if b >= B)
        span = next(s for s in self.spans if s > max(positions))
        pad = [0] * (bucket - B)
        self._inputs[:, :bucket].copy_(torch.tensor([tokens + pad, positions + pad]))
        if self._graphs is not None:
            graph, logits = self._graphs[bucket, span]
            graph.replay()
            return logits[:B].clone()  # the graphs share a memory pool: the next replay may reuse this buffer
        return self._static_step(bucket, span)[:B]

    def _static_step(self, bucket: int, span: int) -> torch.Tensor:
        x, pos = self._inputs[0, :bucket], self._inputs[1, :bucket]
        rows = self._slots[:bucket]
        visible = self._visible(self._span[:span], pos)

        def attend(i: int, q, kv):
            cache = self.kv[i]
            cache[rows, :, :, pos] = kv
            return self._attend_cache(q, cache[:bucket, :, :, :span], visible)

        return self._step(x, pos, attend)

    def _visible(self, span: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """[rows, 1, 1, span] additive mask: 0 up to each row's position, -inf past it. Built once per step, not
        converted from a boolean one by SDPA in every layer."""
        hidden = (span[None, :] > pos[:, None])[:, None, None, :]
        return torch.zeros(hidden.shape, dtype=self.kv[0].dtype, device=self.device).masked_fill_(hidden, float("-inf"))

    def _attend_cache(self, q, cache, visible) -> torch.Tensor:
        """One query token per row against its cached keys/values [B, 2, G, T, D] -> [B, H*D]. Grouped heads
        are query rows of their KV head ([B, G, H/G, D]): the same maths as enable_gqa, which with a mask
        only SDPA's slow math kernel takes. SDPA, not two bmm: on a CPU ~1.7x faster in fp32 at batch 1 and
        level at batch 64; 3-8x in bf16, where oneDNN's bmm at one query row is slow (bench/README.md)."""
        B, G = cache.shape[0], cache.shape[2]
        q = q.view(B, G, self.n_head // G, self.head_dim)
        o = F.scaled_dot_product_attention(q, cache[:, 0], cache[:, 1], attn_mask=visible, scale=self.scale)
        return o.reshape(B, self.n_head * self.head_dim)

    def _capture_graphs(self) -> None:
        """Record the static step of every (batch, span) bucket as a CUDA graph, at load time (a failure shows
        before any request runs), largest first so that the smaller graphs reuse its memory pool. Warm-up runs
        first, on a side stream, as torch.cuda.graphs requires; with no request yet, its cache writes
        land in free slots. On any failure, decoding goes on without graphs (the same step, eagerly)."""
        import warnings

        main, side, pool = torch.cuda.current_stream(), torch.cuda.Stream(), torch.cuda.graph_pool_handle()
        graphs = {}
        try:
            with torch.inference_mode():
                for bucket in reversed(self.buckets):
                    for span in reversed(self.spans):
                        side.wait_stream(main)
                        try:
                            with torch.cuda.stream(side):
                                for _ in range(2):
                                    self._static_step(bucket, span)
                        finally:
                            main.wait_stream(side)
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph, pool=pool):
                            logits = self._static_step(bucket, span)
                        graphs[bucket, span] = (graph, logits)
            self._graphs = graphs
        except Exception as err:  # a capture that raised leaves the capture stream current and the pool open
            torch.cuda.set_stream(main)
            try:
                torch._C._cuda_endAllocateToPool(self.device.index or 0, pool)
            except (AttributeError, RuntimeError):
                pass
            try:
                torch.cuda.synchronize()
            except RuntimeError:  # the failed capture's own error again: the eager step is still usable
                pass
            warnings.warn(f"CUDA graph capture failed, decoding without graphs: {err}")

    def _step(self, x: torch.Tensor | slice, pos: torch.Tensor | slice, attend,
              keep: torch.Tensor | None = None) -> torch.Tensor:
        """The layer stack over token rows `x` at positions `pos` (index tensors, or slices for one row);
        `attend(layer, q, kv)` stores the rows' keys and values [rows, 2, G, D] in the cache and returns the
        attention output [rows, H*D]. Logits for the `keep` rows (default: all)."""
        h = self.wte[x]
        B, H, G, D = h.shape[0], self.n_head, self.n_kv, self.head_dim
        if self.arch == "gpt2":
            h = h + self.wpe[pos]
        else:
            cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # [B, 1, D]
        for i, w in enumerate(self.weights):
            if self.arch == "gpt2":
                a = F.layer_norm(h, h.shape[-1:], w["ln1_w"], w["ln1_b"], self.eps)
                qkv = self.linear(a, w["qkv_w"], w["qkv_b"])
            else:
                a = self._rms(h, w["ln1_w"])
                qkv = self.linear(a, w["qkv_w"])
            qkv = qkv.view(B, H + 2 * G, D)
            if self.arch != "gpt2":  # queries and keys rotated together, in place: k stays beside v
                qk = qkv[:, :H + G]
                qk.copy_(qk * cos + _rotate_half(qk) * sin)
            o = attend(i, qkv[:, :H], qkv[:, H:].view(B, 2, G, D))
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
        if keep is not None:
            h = h[keep]
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
        for cache in self.kv:
            cache[dst, :, :, :length] = cache[src, :, :, :length]

    def _prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """The prompts' tokens back to back through the decode step's layers (no padding: the matmuls, the
        step's cost, see only real tokens), each one's keys/values written to its slot; attention per prompt,
        causal, over its slot of the cache (the queries padded to the longest prompt). Returns each
        prompt's last-position logits [n, V]."""
        n, S, dev = len(prompts), max(map(len, prompts)), self.device
        H, G, D = self.n_head, self.n_kv, self.head_dim
        # per token: its prompt, position and cache slot (built as lists: one host-to-device copy each)
        row = torch.tensor([r for r, p in enumerate(prompts) for _ in p], device=dev)
        pos = torch.tensor([i for p in prompts for i in range(len(p))], device=dev)
        slot = torch.tensor(slots, device=dev)
        token_slot = slot[row]
        last = torch.tensor(list(itertools.accumulate(map(len, prompts))), device=dev) - 1

        def attend(i: int, q, kv):
            cache = self.kv[i]
            cache[token_slot, :, :, pos] = kv
            # a prompt's padded query rows read stale cache entries past its end; their outputs are dropped
            queries = q.new_zeros((n, S, H, D))
            queries[row, pos] = q
            keys, values = cache[slot, 0, :, :S], cache[slot, 1, :, :S]  # [n, G, S, D]
            if G != H:
                keys, values = keys.repeat_interleave(H // G, dim=1), values.repeat_interleave(H // G, dim=1)
            o = F.scaled_dot_product_attention(queries.transpose(1, 2), keys, values, is_causal=True,
                                               scale=self.scale)  # [n, H, S, D]
            return o.transpose(1, 2)[row, pos].reshape(-1, H * D)

        x = torch.tensor([t for p in prompts for t in p], device=dev)
        return self._step(x, pos, attend, keep=last)

def _can_pack(weight: torch.Tensor) -> bool:
    """bf16 weights on a CPU with oneDNN: decode with weights pre-packed into oneDNN's blocked layout
    (what torch.compile's CPU freezing does): about 2x faster at one row, bit-identical results
    (bench/README.md). These ops are PyTorch
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

