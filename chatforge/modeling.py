"""Stage 3: the model, a stock transformers class configured from a named size preset.

`gpt2` builds `GPT2LMHeadModel` (learned positions, LayerNorm, GELU MLP, tied embeddings), `llama`
builds `LlamaForCausalLM` (RoPE, RMSNorm, SwiGLU, optional grouped-query attention). Because they are
the stock classes, every checkpoint is a plain Hugging Face directory that transformers and vLLM load.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from chatforge.errors import ChatforgeError, one_line, transformers_quiet

# name: (n_layer, d_model, n_head, context_length)
PRESETS = {
    "tiny": (4, 192, 6, 256),          # ~2-3M parameters with an 8k vocabulary: CPU demos and tests
    "mini": (6, 384, 6, 256),          # ~14M: the CPU benchmark shape
    "small": (8, 512, 8, 512),         # ~30M: a GPU quickstart in minutes
    "gpt2-small": (12, 768, 12, 1024),   # 124M
    "gpt2-medium": (24, 1024, 16, 1024),  # 350M
    "gpt2-large": (36, 1280, 20, 1024),   # 774M
}
ARCHS = ("gpt2", "llama")
VOCAB_MULTIPLE = 64  # tensor-core and SIMD friendly matmul shapes for the LM head


@dataclass
class ModelShape:
    arch: str = "gpt2"
    n_layer: int = 4
    d_model: int = 192
    n_head: int = 6
    n_kv_head: int | None = None
    context_length: int = 256
    vocab_size: int = 8192
    dropout: float = 0.0


def quiet_optional_imports() -> None:
    """Silence what the libraries log that no user can act on: loading a model (accelerate, through
    transformers) imports torchao when it is installed (the fp8 extra), which logs every CUDA kernel library
    a CPU build lacks and torch's deprecation of how it registers enums; TRL calls transformers' gradient-
    checkpointing names, which warn that they are renamed in v6. Every command calls it first (cli.main),
    and so does every training stage (for library use)."""
    import logging
    import warnings

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def resolve_shape(arch: str, preset: str, vocab_size: int, n_layer=None, d_model=None, n_head=None,
                  n_kv_head=None, context_length=None, dropout: float = 0.0) -> ModelShape:
    if arch not in ARCHS:
        raise ChatforgeError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    if preset not in PRESETS:
        raise ChatforgeError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    base = PRESETS[preset]
    shape = ModelShape(arch=arch, n_layer=n_layer or base[0], d_model=d_model or base[1],
                       n_head=n_head or base[2], n_kv_head=n_kv_head, context_length=context_length or base[3],
                       vocab_size=padded_vocab(vocab_size), dropout=dropout)
    check_heads(arch, shape.d_model, shape.n_head, shape.n_kv_head)
    return shape


def check_heads(arch: str, d_model: int | None, n_head: int | None, n_kv_head: int | None) -> None:
    """Width, heads and KV heads that fit together (a value not given yet, None, is not checked)."""
    if d_model and n_head and d_model % n_head:
        raise ChatforgeError(f"--d-model {d_model} is not divisible by --n-head {n_head}")
    if n_kv_head and (arch != "llama" or (n_head and n_head % n_kv_head)):
        raise ChatforgeError("--n-kv-head needs --arch llama and must divide --n-head")


def padded_vocab(n: int) -> int:
    return int(math.ceil(n / VOCAB_MULTIPLE) * VOCAB_MULTIPLE)


def build_config(shape: ModelShape, bos_id: int, eos_id: int, pad_id: int | None):
    if shape.arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=shape.vocab_size, n_positions=shape.context_length, n_embd=shape.d_model,
            n_layer=shape.n_layer, n_head=shape.n_head, resid_pdrop=shape.dropout, embd_pdrop=shape.dropout,
            attn_pdrop=shape.dropout, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
            tie_word_embeddings=True,
        )
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.d_model, intermediate_size=swiglu_width(shape.d_model),
        num_hidden_layers=shape.n_layer, num_attention_heads=shape.n_head,
        num_key_value_heads=shape.n_kv_head or shape.n_head, max_position_embeddings=shape.context_length,
        attention_dropout=shape.dropout, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
        tie_word_embeddings=True, rope_theta=10000.0,
    )


def new_model(shape: ModelShape, tok, seed: int = 0):
    """A freshly initialised model whose special-token ids match the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from chatforge.text.tokenizer import document_separator_id

    eos = document_separator_id(tok)
    config = build_config(shape, bos_id=eos, eos_id=eos, pad_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    set_generation_defaults(model, tok)
    return model


def set_generation_defaults(model, tok) -> None:
    """generation_config.json: stop at end of turn and end of document; pad is never EOS."""
    from chatforge.text.tokenizer import stop_ids

    stops = stop_ids(tok)
    model.generation_config.eos_token_id = stops
    model.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    model.generation_config.bos_token_id = model.config.bos_token_id


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), for reports and per-machine caches."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def swiglu_width(d_model: int) -> int:
    """Llama's MLP width: ~8/3·d, rounded up to 64 for matmul efficiency."""
    return (int(8 * d_model / 3) + 63) // 64 * 64


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: CPUs with native bf16 matmuls, where bf16 autocast beats fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def resolve_precision(precision: str, flag: str = "--precision", cuda: bool | None = None) -> str:
    """auto: bf16 on GPUs (fp16 where bf16 is missing) and on CPUs with native bf16, else fp32. Training
    uses it for autocast; generation for the weights' dtype (bf16 decodes faster on such CPUs too,
    bench/decode_speed.py). `cuda`: the device in use (default: whether there is a GPU)."""
    import torch

    if precision not in PRECISIONS:
        raise ChatforgeError(f"{flag} must be auto, bf16, fp16 or fp32, got {precision!r}")
    if precision != "auto":
        return precision
    if torch.cuda.is_available() if cuda is None else cuda:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def torch_dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def check_model_folder(path: str) -> None:
    """`path` is a model folder: a Hugging Face model (config.json) or a LoRA adapter (adapter_config.json)."""
    if not os.path.isdir(path):
        raise ChatforgeError(f"{path}: model directory not found")
    if not any(os.path.exists(os.path.join(path, name)) for name in ("config.json", "adapter_config.json")):
        raise ChatforgeError(f"{path}: no config.json: not a Hugging Face model directory")


def load_model(path: str, dtype=None):
    """Load any local Hugging Face causal-LM directory, with a clear error if it is not one."""
    import torch
    from transformers import AutoModelForCausalLM

    from transformers.utils import logging as hf_logging

    check_model_folder(path)
    hf_logging.disable_progress_bar()
    if not os.path.exists(os.path.join(path, "config.json")):  # `sft --lora` without --merge: an adapter
        return _load_adapter(path, dtype or torch.float32)
    try:
        with transformers_quiet():  # its load report and model-type notes: the checks below say it in one line
            model, info = AutoModelForCausalLM.from_pretrained(
                path, attn_implementation="sdpa", dtype=dtype or torch.float32, output_loading_info=True)
    except Exception as err:  # unknown architecture, missing weights, ...: user-fixable
        raise ChatforgeError(f"{path}: cannot load as a causal LM ({one_line(err)})") from None
    # transformers fills weights the file lacks with random values and drops those it has no place for: a model
    # that would be partly random or partly dropped (a config.json edited or copied from another run) is an error
    for kind in ("missing", "unexpected"):  # unexpected buffers (GPT-2's old attn.masked_bias) are harmless
        names = sorted(k for k in info[f"{kind}_keys"] if kind == "missing" or k.endswith(".weight"))
        if names:
            raise ChatforgeError(f"{path}: the weights do not match config.json: {len(names)} {kind} "
                                 f"(first: {names[0]})")
    return model


def _load_adapter(path: str, dtype):
    """A LoRA adapter folder: its base model (the path the adapter records) with the adapter merged in. The base
    gets the embedding rows the adapter was trained with first (sft adds chat tokens, padded to 64 rows)."""
    from peft import PeftConfig, PeftModel
    from safetensors import safe_open

    try:
        base = load_model(PeftConfig.from_pretrained(path).base_model_name_or_path, dtype)
        with safe_open(os.path.join(path, "adapter_model.safetensors"), "pt") as weights:
            rows = [weights.get_slice(k).get_shape()[0] for k in weights.keys()
                    if ("embed" in k or "wte" in k) and "lora_" not in k]  # a saved (modules_to_save) embedding
        if rows and rows[0] != base.get_input_embeddings().weight.shape[0]:
            base.resize_token_embeddings(rows[0])
        with transformers_quiet():
            model = PeftModel.from_pretrained(base, path)
    except ChatforgeError as err:
        raise ChatforgeError(f"{path}: a LoRA adapter whose base model does not load: {err}") from None
    except Exception as err:  # a damaged adapter, an adapter of another base: user-fixable
        raise ChatforgeError(f"{path}: cannot load the LoRA adapter with its base model ({one_line(err)})") from None
    return model.merge_and_unload()


def context_length(config) -> int:
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return 2048


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
