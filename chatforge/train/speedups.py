"""Speed switches for pretraining that leave the model, and so every checkpoint, exactly as it is.

`apply_speedups(model, cfg, precision)` turns on what applies to this machine and says what it did.
Each piece patches only Python behaviour (a forward method on the instance, an activation module
without parameters, the attention function chosen by name): `state_dict`, `config.json` and
`save_pretrained` output are untouched, and `restore_forward` undoes them. Measurements that justify
each piece are in bench/README.md.

- fused loss (`loss.use_fused_loss`): the chunked LM-head cross-entropy, no full-size logits;
- `fuse_gelu`: GPT-2's op-by-op tanh GELU as torch's fused kernel (the same function), or, in compiled
  blocks on a CPU, as x * sigmoid(2z) (the same function again, with the exp inductor vectorises fast);
- CPU attention: on a CPU in bf16, causal attention as two batched matmuls and a softmax, faster than
  SDPA's flash kernel at training block sizes there;
- packed SDPA: with `--fast-batches` (no padding) SDPA gets `is_causal=True` and no T x T mask, compiled
  or not;
- compiled blocks (`--compile` on a CPU): each transformer block through torch.compile (inductor's C++
  kernels fuse GELU, LayerNorm, residuals and casts), and each chunk's softmax and gradient in the loss;
- FlashAttention 3 / 2 on a GPU when the package is installed (nothing is downloaded);
- FP8 (off by default): torchao's FP8 training matmuls in the nn.Linear layers, same parameters.

The attention pieces register chatforge-named functions with transformers' AttentionInterface (its
documented extension point, process-wide by design); models that do not ask for them by name are
unaffected.
"""

from __future__ import annotations

import math

import torch

from chatforge.errors import ChatforgeError
from chatforge.modeling import context_length
from chatforge.train.loss import use_fused_loss


def restore_forward(model) -> None:
    """Undo `use_fused_loss` (and any wrapper set on the instance), `compile_blocks` (and its `SigmoidGELU`),
    `use_cpu_attention` and a FlashAttention implementation: the model object goes back to the SDPA it was
    built with."""
    model.__dict__.pop("forward", None)
    model.__dict__.pop("_original_forward", None)
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:  # set by nn.Module.compile
            module._compiled_call_impl = None
    # SigmoidGELU is six ops eagerly: the fused kernel again, the same function
    _swap_children(model, SigmoidGELU, lambda: torch.nn.GELU(approximate="tanh"))
    if model.config._attn_implementation != "sdpa":
        model.set_attn_implementation("sdpa")


class SigmoidGELU(torch.nn.Module):
    """GPT-2's tanh GELU, 0.5 x (1 + tanh(z)) with z = sqrt(2/pi) (x + 0.044715 x^3), written as the same
    function x * sigmoid(2z), in fp32 (equal to rounding; bf16 outputs differ by at most one unit in the
    last place, in the negative tail). Why: inductor's C++ kernels compute tanh with a slow accurate
    routine and exp with a fast one; in compiled blocks on an AMX Xeon this GELU's forward + backward
    kernels take half the tanh one's time (bench/README.md). For compiled code only: eagerly it is six
    ops, not one."""

    K = 2 * math.sqrt(2 / math.pi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.sigmoid(xf * (self.K + self.K * 0.044715 * xf * xf))).to(x.dtype)


def fuse_gelu(model, compiled_cpu: bool = False) -> int:
    """Swap GPT-2's op-by-op tanh GELU for PyTorch's fused one (same formula), or for `SigmoidGELU` when
    the blocks will be compiled on a CPU; returns how many."""
    from transformers.activations import NewGELUActivation

    return _swap_children(model, NewGELUActivation,
                          SigmoidGELU if compiled_cpu else lambda: torch.nn.GELU(approximate="tanh"))


def _swap_children(model, kind: type, make) -> int:
    """Replace every submodule of exactly type `kind` by `make()`; returns how many."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is kind:
                setattr(module, name, make())
                swapped += 1
    return swapped


def compile_blocks(model) -> int:
    """torch.compile every transformer block (the classes transformers names in `_no_split_modules`) in
    place; returns how many. Parameters, state_dict and saved files do not change.

    Why blocks, not the model: on a CPU the whole model and the blocks alone train equally fast (1.35x
    eager at 6x384 on a Xeon with AMX, bench/README.md), but one block's graph serves every layer, so it
    compiles in about half the time; the chunked loss compiles its chunk's softmax and gradient itself
    (`use_fused_loss(compiled=True)`)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    for block in blocks:
        block.compile()
    return len(blocks)


# a bf16 CPU run compiles its blocks when --compile is not given, from this width on: 1.35-1.4x a step at
# 6x384 on a Xeon with AMX, nothing at 4x192 and 2x128, where the LM head and loss dominate; in fp32 (AMD
# Zen 3, no native bf16) 1.01x at 6x384 for 16 s more to the first step (bench/README.md)
AUTO_COMPILE_WIDTH = 384


def compile_by_default(d_model: int, single_process: bool, precision: str) -> bool:
    """Whether a run without --compile / --no-compile compiles: a single-process bf16 CPU run from
    AUTO_COMPILE_WIDTH, when the C++ compiler inductor calls ($CXX, else g++) is installed. Never by default
    on a GPU, nor under DDP/FSDP, where compiled blocks are not measured or tested here."""
    import os
    import shutil

    return (single_process and precision == "bf16" and not torch.cuda.is_available()
            and d_model >= AUTO_COMPILE_WIDTH
            and shutil.which(os.environ.get("CXX") or "g++") is not None)


# ---------------------------------------------------------------- causal attention on CPU

CPU_ATTENTION = "chatforge_cpu"
PACKED_SDPA = "chatforge_packed_sdpa"
_CAUSAL = torch.empty(0, 0)  # fp32: 0 on and below the diagonal, -inf above; see _causal_bias


def _causal_bias(t: int, dtype) -> torch.Tensor:
    """(t, t): 0 on and below the diagonal, -inf above, sliced from one table that `use_cpu_attention` sizes
    to the model's context. Why a table, not `full(...).triu(1)` in the graph: inductor then recomputes the
    mask per element inside the softmax kernel, ~20% of the attention's time (bench/README.md); one tensor,
    not a dictionary per length: dynamo would guard on the dictionary."""
    if t > _CAUSAL.shape[0]:
        if torch.compiler.is_compiling():  # a length the table lacks: built in the graph instead
            return torch.full((t, t), float("-inf"), dtype=dtype).triu(1)
        _grow_causal_table(t)
    return _CAUSAL[:t, :t].to(dtype)


def _grow_causal_table(t: int) -> None:
    """At least t x t, in eager code (compiled code reads the table, never replaces it)."""
    global _CAUSAL
    if t > _CAUSAL.shape[0]:
        _CAUSAL = torch.full((t, t), float("-inf")).triu(1)


def cpu_causal_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                         is_causal=None, **kwargs):
    """softmax(QK^T * scale + causal mask) V, the function SDPA computes, as two matmuls and a softmax.

    Why: in bf16, PyTorch's CPU flash-attention kernel is slower than plain batched matmuls at training
    block sizes (bench/README.md). The scale goes on Q (4x fewer elements than the scores at T 256, head 64) and the mask is an added
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
    weights = (scores + _causal_bias(t, scores.dtype)).softmax(-1)
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
    _grow_causal_table(context_length(model.config))  # sized before compiling


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


def apply_speedups(model, cfg, precision: str, log=print) -> list[str]:
    """Turn on the speed switches of `cfg` (a PretrainConfig) that apply here; returns (and logs) their
    names. Called before the Trainer wraps model.forward (autocast, DDP), so the wrappers apply to the
    fast forward."""
    on = []
    cuda = torch.cuda.is_available()
    compiled_cpu = bool(cfg.compile) and not cuda
    if cfg.fused_gelu and fuse_gelu(model, compiled_cpu=compiled_cpu):
        on.append("GELU by sigmoid" if compiled_cpu else "fused GELU")
    if cfg.fused_loss and use_fused_loss(model, compiled=compiled_cpu):
        on.append("compiled chunked loss" if compiled_cpu else "chunked loss")
    # bf16 only: in fp32 the matmul path is slower than SDPA's kernel (bench/README.md)
    if cfg.cpu_attention and precision == "bf16" and not cuda:
        use_cpu_attention(model)
        on.append("CPU attention")
    if cfg.compile and not cuda:  # on a GPU the Trainer compiles the whole model (torch_compile)
        on.append(f"{compile_blocks(model)} compiled blocks")
    flash = flash_attention_implementation() if cfg.flash_attention and precision in ("bf16", "fp16") else None
    if flash:
        model.set_attn_implementation(flash)
        on.append(flash)
    elif cfg.fast_batches and model.config._attn_implementation == "sdpa":
        use_packed_sdpa(model)
        on.append("packed SDPA")
    if cfg.fp8:
        converted = use_fp8(model)
        if not converted:
            raise ChatforgeError("--fp8: the model has no nn.Linear layer to convert (GPT-2's layers are "
                                 "Conv1D: use --arch llama)")
        on.append(f"FP8 in {converted} linear layers")
    if cfg.fast_batches:
        on.append("fast batches")
    log(f"speed switches: {', '.join(on) or 'none'}")
    return on
