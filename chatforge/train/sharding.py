"""Sharded training (FSDP2, DeepSpeed ZeRO) through the transformers Trainer, and the Trainer every stage runs.

The Trainer and accelerate do the sharding; chatforge adds three things around them:
- its optimizer (AdamW, decay on matrices) and schedule come from the Trainer's own hooks, the one way the
  Trainer accepts them under FSDP and DeepSpeed (it refuses a ready-made optimizer there);
- FSDP on CPU processes: accelerate turns FSDP on only for accelerator devices, while FSDP2 itself runs on
  gloo. chatforge marks accelerate's state as FSDP there, so a CPU cluster and the tests take the GPU path;
- a tied LM head is written once: the gathered full state dict holds the embedding twice, as two tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

from chatforge.errors import ChatforgeError


def check_sharding(cfg) -> None:
    """The sharding options of a RunSettings, checked with the other options (before any work)."""
    import importlib.util

    if cfg.fsdp and cfg.deepspeed:
        raise ChatforgeError("--fsdp and --deepspeed are two ways to shard: give one")
    if cfg.fsdp_offload and not cfg.fsdp:
        raise ChatforgeError("--fsdp-offload offloads FSDP's shards: it needs --fsdp")
    if cfg.deepspeed:
        try:
            json.loads(Path(cfg.deepspeed).read_text(encoding="utf-8"))
        except OSError as err:
            raise ChatforgeError(f"--deepspeed {cfg.deepspeed}: cannot read ({err.strerror})") from None
        except ValueError as err:
            raise ChatforgeError(f"--deepspeed {cfg.deepspeed}: not a JSON config ({err})") from None
        if importlib.util.find_spec("deepspeed") is None:
            raise ChatforgeError("--deepspeed needs the deepspeed package: pip install deepspeed")


def sharding_arguments(cfg, world: int, log=print) -> dict:
    """TrainingArguments for --fsdp / --deepspeed (none for one process: there is nothing to shard)."""
    if not (cfg.fsdp or cfg.deepspeed):
        return {}
    if world == 1 and cfg.fsdp:
        log("--fsdp: one process, nothing to shard; training unsharded (launch with torchrun for several)")
        return {}
    if cfg.deepspeed:
        return {"deepspeed": cfg.deepspeed}
    # the wrapped block class comes from the model's _no_split_modules (GPT2Block, LlamaDecoderLayer);
    # checkpoints gather a full state dict: every saved folder is a plain Hugging Face directory
    return {"fsdp": True, "fsdp_config": {"version": 2, "cpu_offload": cfg.fsdp_offload,
                                          "state_dict_type": "FULL_STATE_DICT", "reshard_after_forward": True}}


def checkpoint_sharding(checkpoint: str) -> str:
    """How a checkpoint's optimizer state was written: "fsdp", "deepspeed" or "" (one file, unsharded)."""
    folder = Path(checkpoint)
    if any(folder.glob("pytorch_model_fsdp*")):
        return "fsdp"
    return "deepspeed" if any(folder.glob("global_step*")) else ""


def check_resume(checkpoint: str | None, arguments: dict) -> None:
    """The Trainer resumes a checkpoint only with the sharding that wrote it (else a traceback or a hang)."""
    if checkpoint is None:
        return
    wrote = checkpoint_sharding(checkpoint)
    runs = "fsdp" if arguments.get("fsdp") else "deepspeed" if arguments.get("deepspeed") else ""
    if wrote != runs:
        how = {"fsdp": "--fsdp under torchrun (2+ processes)", "deepspeed": "--deepspeed CONFIG under torchrun",
               "": "neither --fsdp nor --deepspeed"}
        raise ChatforgeError(f"{checkpoint} was written {'by a ' + wrote + ' run' if wrote else 'unsharded'}: resume "
                             f"it with {how[wrote]}, or start a new run from its weights (--init-from / --model)")


def chatforge_trainer(base):
    """`base` (the Trainer or a TRL trainer) with chatforge's optimizer, FSDP on CPU and tied weights saved once."""

    class ChatforgeTrainer(base):
        def __init__(self, *args, make_optimizer, make_scheduler, **kwargs):
            self._make_optimizer, self._make_scheduler = make_optimizer, make_scheduler
            super().__init__(*args, **kwargs)

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = self._make_optimizer(self.model if model is None else model)
            return self.optimizer

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = self._make_scheduler(optimizer or self.optimizer)
                self._created_lr_scheduler = True
            return self.lr_scheduler

        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            if self.args.fsdp and not self.is_fsdp_enabled and self.accelerator.num_processes > 1:
                from accelerate import PartialState
                from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

                state = self.accelerator.state
                state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
                # both: every AcceleratorState() copies the process state's type again
                PartialState().distributed_type = state.distributed_type = DistributedType.FSDP
                self.is_fsdp_enabled = True

        def _save(self, output_dir=None, state_dict=None):
            if state_dict:
                drop_tied_copies(self.accelerator.unwrap_model(self.model, keep_torch_compile=False), state_dict)
            card = Path(output_dir or self.args.output_dir) / "README.md"
            had_card = card.exists()
            super()._save(output_dir, state_dict=state_dict)
            if not had_card and card.exists():  # PEFT's adapter card (base model "None"): see create_model_card
                card.unlink()

        def create_model_card(self, *args, **kwargs) -> None:
            """None: TRL's cards name no base model and stand where `chatforge report` puts the run's card."""

    ChatforgeTrainer.__name__ = ChatforgeTrainer.__qualname__ = f"Chatforge{base.__name__}"
    return ChatforgeTrainer


def drop_tied_copies(model, state_dict: dict) -> None:
    """Keep one name per tied parameter (the first, as `from_pretrained` expects: the input embedding)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for group in names.values():
        if group[0] in state_dict:
            for copy in group[1:]:
                state_dict.pop(copy, None)
