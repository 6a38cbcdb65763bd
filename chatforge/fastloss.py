"""Speed pieces for pretraining that leave the model, and so every checkpoint, exactly as it is.

Where the time went (py-spy + torch.profiler, CPU shape 6x384, seq 256, batch 8, vocab 7.7k, bf16):
besides the matmuls, a large share is elementwise work that transformers' GPT-2 spells out op by op
(`NewGELUActivation`: ~8 kernels forward and more backward, ~8% of the step in the forward alone),
and the loss: transformers upcasts the whole (B, T, V) logits tensor to fp32 for the cross-entropy,
accelerate's `convert_outputs_to_fp32` copies the logits once more, and log-softmax backward walks
them again. The Trainer's default collator (`DataCollatorWithPadding`) pads per step in Python and
adds an all-ones `attention_mask` that packed blocks never need.

Each piece below is switched by a `PretrainConfig` flag and patches only Python behaviour (a forward
method on the instance, an activation module without parameters, the dataloader's batch fetch):
`state_dict`, `config.json` and `save_pretrained` output are untouched.

- `chunked_lm_loss`: cross-entropy over the LM head computed chunk by chunk, gradients included, inside
  one autograd Function: no full-size logits are ever stored, never in fp32. Equal to transformers'
  `ForCausalLMLoss` (same shift, ignore_index -100, mean or sum / num_items_in_batch) to fp32 rounding.
- `use_fused_loss`: makes a causal-LM's forward return that loss (and no logits) when given labels.
- `fuse_gelu`: swaps GPT-2's `NewGELUActivation` for `nn.GELU(approximate="tanh")`, the same function
  as one fused kernel.
- `use_cpu_attention`: on a CPU in bf16, causal self-attention over packed blocks as two batched matmuls
  and a softmax instead of SDPA's flash kernel, which is slower at training block sizes here.
- `flash_attention_implementation`: on a GPU, transformers' FlashAttention 3 / 2 when the package is
  installed (nothing is downloaded); SDPA otherwise.
- `use_fp8` (off by default): torchao's FP8 training matmuls in the nn.Linear layers (Llama-style
  models; GPT-2's layers are Conv1D), same parameters.
- `BlockBatches` + `collate_blocks`: a whole micro-batch gathered from the memory-mapped shards with
  one numpy index (`__getitems__`), no per-sample tensors, no padding, no attention_mask; with
  `use_packed_sdpa`, SDPA runs with `is_causal=True` and no T x T mask is built, compiled or not.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from chatforge.data import PackedBlocks
from chatforge.errors import ChatforgeError

IGNORE_INDEX = -100


# ---------------------------------------------------------------- chunked LM-head cross-entropy


def _compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype autocast would run the LM-head matmul in (the input's dtype when autocast is off)."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over valid rows of CE(hidden @ weight.T, targets), scaled by `scale`.

    The gradients w.r.t. hidden and weight are computed in the forward pass, chunk by chunk (as Liger's
    fused linear cross-entropy does), so backward only rescales them by the incoming gradient: peak
    extra memory is one (chunk, V) fp32 block instead of the (N, V) logits in bf16 plus fp32 copies.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, chunk_rows, compute_dtype):
        n, _ = hidden.shape
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            need_grad = any(ctx.needs_input_grad[:2])  # False under no_grad (evaluation): loss only
            grad_hidden = torch.empty_like(hidden) if need_grad else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
            for start in range(0, n, chunk_rows):
                h = hidden[start:start + chunk_rows].to(compute_dtype)
                y = targets[start:start + chunk_rows]
                logits = (h @ w.t()).float()                          # (chunk, V), fp32 only per chunk
                valid = y != IGNORE_INDEX
                safe_y = torch.where(valid, y, 0)
                lse = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, safe_y[:, None]).squeeze(1)
                loss += ((lse - picked) * valid).sum()
                if need_grad:  # d loss / d logits = softmax - onehot, on valid rows, times scale
                    grad = logits.sub_(lse[:, None]).exp_()           # softmax, in place of the logits
                    grad.scatter_add_(1, safe_y[:, None], -torch.ones_like(lse)[:, None])
                    grad.mul_((valid.to(grad.dtype) * scale)[:, None])
                    grad = grad.to(compute_dtype)
                    grad_hidden[start:start + chunk_rows] = (grad @ w).to(hidden.dtype)
                    grad_weight += (grad.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss * scale

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_output.to(grad_hidden.dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_weight * grad_output).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None


def default_chunk_rows(device: torch.device) -> int:
    """Rows of logits per chunk. CPU: 512 keeps a (512, V) fp32 block in cache (measured, 6x384 shape,
    V 7.7k, bf16: loss fwd+bwd 133 ms at 512 rows vs 201 ms at 2048 vs 266 ms for transformers' loss).
    GPU: 2048 rows keep the LM-head matmuls large (and a (2048, 50k) fp32 block is ~400 MB)."""
    return 512 if device.type == "cpu" else 2048


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    num_items_in_batch=None, chunk_rows: int | None = None) -> torch.Tensor:
    """transformers' causal-LM loss (shift by one, ignore -100; mean, or sum / num_items_in_batch when
    given) for `logits = hidden @ weight.T`, without materialising the logits.

    hidden: (B, T, d) final hidden states; weight: (V, d) LM-head weight (no bias); labels: (B, T).
    """
    b, t, d = hidden.shape
    chunk_rows = chunk_rows or default_chunk_rows(hidden.device)
    # same shift as transformers' ForCausalLMLoss: pad labels with -100 on the right, drop the first
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1).to(hidden.device)
    if num_items_in_batch is not None:
        denom = num_items_in_batch
    else:
        denom = (targets != IGNORE_INDEX).sum()
    # the divisor is a tensor on the device when the Trainer passes it: dividing after the Function
    # keeps it out of the Python scalar path (no host sync)
    total = _ChunkedLinearCrossEntropy.apply(hidden.reshape(b * t, d), weight, targets, 1.0, chunk_rows,
                                             _compute_dtype(hidden.device.type, hidden.dtype))
    if isinstance(denom, torch.Tensor):
        denom = denom.to(total.device, total.dtype)
    return total / denom


# ---------------------------------------------------------------- model patches (no parameter changes)


def use_fused_loss(model, chunk_rows: int | None = None) -> bool:
    """Make `model(input_ids, labels=...)` return the chunked loss and no logits.

    Only the instance's `forward` changes (set before the Trainer wraps it with autocast / DDP, so
    both still apply); weights, config and saved files do not. Calls without labels (generation,
    `return_outputs`) take the stock forward. Returns False for heads it cannot fuse (a bias).
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None or not hasattr(model, "base_model"):
        return False
    stock_forward = type(model).forward

    def forward(self, input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None, **kwargs):
        if labels is None or kwargs.get("output_hidden_states") or kwargs.get("return_dict") is False:
            return stock_forward(self, input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                 num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs.pop("use_cache", None)
        out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        loss = chunked_lm_loss(out.last_hidden_state, self.get_output_embeddings().weight, labels,
                               num_items_in_batch, chunk_rows)
        return CausalLMOutputWithPast(loss=loss)

    model.forward = types.MethodType(forward, model)
    return True


def restore_forward(model) -> None:
    """Undo `use_fused_loss` (and any wrapper set on the instance), `use_cpu_attention` and a FlashAttention
    implementation: the model object goes back to the SDPA it was built with."""
    model.__dict__.pop("forward", None)
    model.__dict__.pop("_original_forward", None)
    if model.config._attn_implementation != "sdpa":
        model.set_attn_implementation("sdpa")


def fuse_gelu(model) -> int:
    """Swap GPT-2's op-by-op tanh GELU for PyTorch's fused one (same formula); returns how many."""
    from transformers.activations import NewGELUActivation

    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is NewGELUActivation:
                setattr(module, name, torch.nn.GELU(approximate="tanh"))
                swapped += 1
    return swapped


# ---------------------------------------------------------------- causal attention on CPU

CPU_ATTENTION = "chatforge_cpu"
PACKED_SDPA = "chatforge_packed_sdpa"
_CAUSAL_BIAS: dict = {}


def _causal_bias(t: int, device, dtype) -> torch.Tensor:
    """(t, t): 0 on and below the diagonal, -inf above; one per length, device and dtype, built once."""
    key = (t, str(device), dtype)
    if key not in _CAUSAL_BIAS:
        _CAUSAL_BIAS[key] = torch.full((t, t), float("-inf"), dtype=dtype, device=device).triu(1)
    return _CAUSAL_BIAS[key]


def cpu_causal_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                         is_causal=None, **kwargs):
    """softmax(QK^T * scale + causal mask) V, the function SDPA computes, as two matmuls and a softmax.

    Why: in bf16, PyTorch's CPU flash-attention kernel is slower than plain batched matmuls at training
    block sizes (measured, batch 8, 6 heads, T 256, head 64, forward + backward per layer: ~37 vs ~19 ms).
    The scale goes on Q (4x fewer elements than the scores at T 256, head 64) and the mask is an added
    constant (its backward is free, unlike masked_fill's). Anything else (a padding mask, dropout,
    grouped KV heads, a cache, GPU) goes to SDPA.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    t = query.shape[2]
    if (attention_mask is not None or not causal or query.device.type != "cpu" or key.shape[2] != t
            or key.shape[1] != query.shape[1] or (dropout and module.training) or t == 1):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = (query * scale) @ key.transpose(-1, -2)
    weights = (scores + _causal_bias(t, query.device, scores.dtype)).softmax(-1)
    return (weights @ value).transpose(1, 2).contiguous(), None


def packed_causal_mask(*args, **kwargs):
    """transformers' SDPA mask, except None (SDPA's own `is_causal=True`) for a batch without padding and
    without a cache. Why: transformers builds a (B, 1, T, T) mask whenever it is being traced (under
    torch.compile, in 5.x before torch 2.14), and on a GPU a mask rules out SDPA's flash kernel."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    plain_causal = (kwargs.get("mask_function") is causal_mask_function and kwargs.get("allow_is_causal_skip", True)
                    and kwargs.get("attention_mask") is None and kwargs.get("q_length") == kwargs.get("kv_length")
                    and not kwargs.get("q_offset") and not kwargs.get("kv_offset"))
    return None if plain_causal else sdpa_mask(*args, **kwargs)


def _register(name: str, attention) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention)
    # without a registered mask function transformers hands a custom implementation no mask at all:
    # padding would be silently ignored
    AttentionMaskInterface.register(name, packed_causal_mask)


def use_cpu_attention(model) -> None:
    """Route the model's attention through `cpu_causal_attention` (registered with transformers'
    AttentionInterface). Only the in-memory setting changes: config.json does not record it."""
    _register(CPU_ATTENTION, cpu_causal_attention)
    model.set_attn_implementation(CPU_ATTENTION)


def use_packed_sdpa(model) -> None:
    """SDPA with `packed_causal_mask`: for `--fast-batches` (no padding), so that a compiled model still
    calls SDPA with `is_causal=True` instead of a materialised T x T mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _register(PACKED_SDPA, sdpa_attention_forward)
    model.set_attn_implementation(PACKED_SDPA)


# ---------------------------------------------------------------- GPU: FlashAttention, FP8


def flash_attention_implementation() -> str | None:
    """transformers' FlashAttention implementation for this machine: "flash_attention_3" on Hopper when
    the `flash_attn_interface` package (FA3) is installed, "flash_attention_2" when `flash_attn` is, None
    otherwise (SDPA stays, whose CUDA kernels include a FlashAttention-2 port). Never installs anything."""
    if not torch.cuda.is_available():
        return None
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    if torch.cuda.get_device_capability()[0] == 9 and is_flash_attn_3_available():
        return "flash_attention_3"
    return "flash_attention_2" if is_flash_attn_2_available() else None


def use_fp8(model) -> int:
    """FP8 matmuls for training through torchao (dynamic per-tensor scales; e4m3 forward, e5m2
    gradients) in every nn.Linear whose sizes are multiples of 16, the LM head excepted (its logits
    feed the loss). torchao's Float8Linear is an nn.Linear holding the same high-precision parameters, so
    state_dict keys, shapes and saved checkpoints do not change. Returns how many layers were converted."""
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as err:
        raise ChatforgeError("--fp8 needs torchao: pip install torchao") from err
    head = model.get_output_embeddings()

    def eligible(module, fqn: str) -> bool:
        return (isinstance(module, torch.nn.Linear) and module is not head
                and module.in_features % 16 == 0 and module.out_features % 16 == 0)

    plain = lambda: sum(type(m) is torch.nn.Linear for m in model.modules())  # noqa: E731
    before = plain()
    convert_to_float8_training(model, module_filter_fn=eligible)
    return before - plain()


# ---------------------------------------------------------------- batches straight from the shards


class BlockBatches(PackedBlocks):
    """PackedBlocks whose DataLoader fetches a whole micro-batch with one numpy gather.

    torch's DataLoader calls `__getitems__(indices)` when a dataset has it, instead of indexing item by
    item and collating; the sampler (and so the order, shuffling and resume position) is unchanged.
    """

    def __getitems__(self, indices) -> dict:
        ids = torch.from_numpy(self.rows(indices))
        return {"input_ids": ids, "labels": ids}


def collate_blocks(batch):
    """Trainer data collator: a batch from `BlockBatches.__getitems__` passes through; a list of items
    (another dataset) is stacked. Never adds an attention_mask: packed blocks have no padding."""
    if isinstance(batch, dict):
        return batch
    ids = torch.stack([torch.as_tensor(item["input_ids"]) for item in batch])
    labels = torch.stack([torch.as_tensor(item.get("labels", item["input_ids"])) for item in batch])
    return {"input_ids": ids, "labels": labels}
