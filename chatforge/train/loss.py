"""The LM loss without the logits: cross-entropy over the LM head, computed chunk by chunk.

Why: transformers upcasts the whole (B, T, V) logits tensor to fp32 for the cross-entropy, accelerate
copies the logits once more, and log-softmax backward walks them again (bench/README.md). Here no
full-size logits are ever stored, never in fp32; the result equals transformers' `ForCausalLMLoss`
(same shift, ignore_index -100, mean or sum / num_items_in_batch) to fp32 rounding (tested).
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


# ---------------------------------------------------------------- chunked LM-head cross-entropy


def _compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype autocast would run the LM-head matmul in (the input's dtype when autocast is off)."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def chunk_loss(logits: torch.Tensor, targets: torch.Tensor, scale: float, need_grad: bool):
    """(sum of the cross-entropy over the rows whose target is not ignored, its gradient w.r.t. `logits`
    times `scale` in the logits' dtype, or None) for one chunk of logits (rows, V)."""
    valid = targets != IGNORE_INDEX
    safe_y = torch.where(valid, targets, 0)
    # softmax's own kernel, never torch.exp: on a CPU, exp of a logit more than ~87 below the row's peak (a
    # confident model) takes a ~5x slower path (bench/README.md). The log-sum-exp comes from the largest
    # probability, at the peak logit (>= 1/V, it cannot underflow).
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # fp32 only per chunk
    lse = logits.amax(dim=-1).float() - probs.amax(dim=-1).log()
    picked = logits.gather(1, safe_y[:, None]).squeeze(1).float()
    loss = ((lse - picked) * valid).sum()
    if not need_grad:
        return loss, None
    # d loss / d logits = softmax - onehot, on valid rows, times scale
    probs.scatter_add_(1, safe_y[:, None], -torch.ones_like(lse)[:, None])
    return loss, probs.mul_((valid.to(probs.dtype) * scale)[:, None]).to(logits.dtype)


@functools.cache
def _compiled_chunk_loss():
    """`chunk_loss` through inductor, for the full training chunks of runs whose blocks are compiled on a CPU:
    one fused kernel in place of the softmax, two amax, the casts and the scatter (2.5-2.9 vs 3.7-3.8 ms a
    (512, 7,680) bf16 chunk on an AMX Xeon, confident logits too; bench/README.md)."""
    return torch.compile(chunk_loss)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over valid rows of CE(hidden @ weight.T, targets), scaled by `scale`.

    The gradients w.r.t. hidden and weight are computed in the forward pass, chunk by chunk (as Liger's
    fused linear cross-entropy does), so backward only rescales them by the incoming gradient: peak
    extra memory is one (chunk, V) fp32 block instead of the (N, V) logits in bf16 plus fp32 copies.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, chunk_rows, compute_dtype, need_grad, compiled):
        n, _ = hidden.shape
        # compiled for full training chunks only: evaluation and a short last chunk would each compile a graph of
        # their own (seconds apiece on a small CPU) for little time saved
        full_chunk_fn = _compiled_chunk_loss() if compiled and need_grad else chunk_loss
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if need_grad else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
            for start in range(0, n, chunk_rows):
                h = hidden[start:start + chunk_rows].to(compute_dtype)
                logits = h @ w.t()                                    # (chunk, V), compute dtype
                fn = full_chunk_fn if len(h) == chunk_rows else chunk_loss
                part, grad = fn(logits, targets[start:start + chunk_rows], scale, need_grad)
                loss += part
                if need_grad:
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
        return gh, gw, None, None, None, None, None, None


def default_chunk_rows(device: torch.device) -> int:
    """Rows of logits per chunk. CPU: 512 keeps a (512, V) fp32 block in cache (bench/README.md); GPU:
    2048 keep the LM-head matmuls large (and a (2048, 50k) fp32 block is ~400 MB)."""
    return 512 if device.type == "cpu" else 2048


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    num_items_in_batch=None, chunk_rows: int | None = None, compiled: bool = False) -> torch.Tensor:
    """transformers' causal-LM loss (shift by one, ignore -100; mean, or sum / num_items_in_batch when
    given) for `logits = hidden @ weight.T`, without materialising the logits.

    hidden: (B, T, d) final hidden states; weight: (V, d) LM-head weight (no bias); labels: (B, T);
    compiled: each chunk's softmax and gradient through inductor (`_compiled_chunk_loss`).
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
    # gradients only when backward can run: evaluation (no_grad) computes the loss alone, a third of the FLOPs
    # (needs_input_grad inside the Function says True even there)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    total = _ChunkedLinearCrossEntropy.apply(hidden.reshape(b * t, d), weight, targets, 1.0, chunk_rows,
                                             _compute_dtype(hidden.device.type, hidden.dtype), need_grad, compiled)
    if isinstance(denom, torch.Tensor):
        denom = denom.to(total.device, total.dtype)
    return total / denom


# ---------------------------------------------------------------- model patches (no parameter changes)


def use_fused_loss(model, chunk_rows: int | None = None, compiled: bool = False) -> bool:
    """Make `model(input_ids, labels=...)` return the chunked loss and no logits.

    Only the instance's `forward` changes (set before the Trainer wraps it with autocast / DDP, so
    both still apply); weights, config and saved files do not. Calls without labels (generation,
    `return_outputs`) take the stock forward. Returns False for heads it cannot fuse (a bias). `compiled`:
    each chunk's softmax and gradient through inductor (for runs whose blocks are compiled on a CPU).
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
        # Without a cache transformers looks for packed sequences in the position ids: on a GPU a host sync per
        # step, and a full T x T mask when the whole model is compiled (no flash kernel). With no position ids
        # given there is nothing packed to find, so a cache (the Trainer turns config.use_cache off) skips the
        # search. Not in an eager forward on a CPU: there the search costs microseconds, and a cache handed to
        # compiled blocks (--compile on a CPU) makes each layer compile its own graph (dynamo guards on it).
        if kwargs.get("position_ids") is None and (torch.compiler.is_compiling() or self.device.type != "cpu"):
            kwargs["use_cache"] = True
        out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        loss = chunked_lm_loss(out.last_hidden_state, self.get_output_embeddings().weight, labels,
                               num_items_in_batch, chunk_rows, compiled)
        return CausalLMOutputWithPast(loss=loss)

    model.forward = types.MethodType(forward, model)
    return True


