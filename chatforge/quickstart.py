"""`chatforge quickstart`: the whole pipeline on the built-in demo corpus, in minutes, on a laptop CPU.

tokenizer -> pretrain a small GPT -> fine-tune it for chat -> a sample conversation -> scores on the
built-in eval suite and a report with plots and model cards. Each stage is the
same code the individual commands run; only the budgets are set for a ~5 minute run on 2 CPU cores
(or a larger model in the same time when a GPU is present).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from chatforge.config import option
from chatforge.errors import ChatforgeError
from chatforge.text.tokenizer import MIN_VOCAB

SAMPLE_PROMPTS = {
    "en": ["Hello", "What is AI?", "Tell me a joke", "Do you like books?"],
    "zh": ["你好", "什么是人工智能？", "给我讲个笑话", "你喜欢什么书？"],
}


@dataclass
class QuickstartConfig:
    """`chatforge quickstart`: the whole pipeline on the built-in demo corpus."""

    out: str = option("quickstart", "output folder", metavar="DIR")
    lang: str = option("en", "demo corpus language: en, zh, de, fr, ...")
    pretrain_seconds: float | None = option(None, "pretraining budget (default: 240 on CPU, 300 on GPU)", min=0.0,
                                            exclusive_min=True, metavar="S")
    sft_seconds: float | None = option(None, "fine-tuning budget (default: 180)", min=0.0, exclusive_min=True,
                                       metavar="S")
    vocab_size: int = option(2048, "tokenizer vocabulary", min=MIN_VOCAB, max=65536, metavar="N")

    def validate(self) -> None:
        from chatforge.text.sources import DEMO_LANGUAGES, demo_dir

        if self.lang not in DEMO_LANGUAGES and not (demo_dir() / self.lang).is_dir():
            raise ChatforgeError(f"--lang {self.lang}: unknown demo language (known: {', '.join(sorted(DEMO_LANGUAGES))})")


def quickstart(cfg: QuickstartConfig, overwrite: bool = False, log=print) -> dict:
    import torch

    from chatforge.engine import Engine, SamplingParams
    from chatforge.outputs import check_not_inputs, claim
    from chatforge.text.tokenizer import TokenizerConfig, train_tokenizer
    from chatforge.train.pretrain import PretrainConfig, pretrain
    from chatforge.train.sft import SFTConfig, sft

    cfg.validate()
    check_not_inputs(cfg.out, [])
    claim(cfg.out, "quickstart", overwrite=overwrite, resume=None)
    gpu = torch.cuda.is_available()
    started = time.time()
    data = [f"demo:{cfg.lang}"]
    out = Path(cfg.out)
    log(f"[1/5] tokenizer: byte-level BPE on the {cfg.lang} demo corpus (chatterbot-corpus)")
    train_tokenizer(TokenizerConfig(data=data, out=str(out / "tokenizer"), vocab_size=cfg.vocab_size), log=log)

    log("[2/5] pretrain: a GPT-2 from scratch on the same text, its size chosen for the time budget")
    base = pretrain(PretrainConfig(
        data=data, out=str(out / "base"), tokenizer=str(out / "tokenizer"), preset="auto",
        context_length=None if gpu else 256,  # room for a few chat turns, more than a budget-sized CPU run takes
        max_time=cfg.pretrain_seconds or (300 if gpu else 240), max_epochs=12, val_fraction=0.02,
        # pretrain's default learning rate: 2e-3 held back the deeper shapes a quiet CPU affords
        # (depth 6: val loss 3.56 vs 2.91 at 1e-3; bench/README.md, "Quickstart's model")
        micro_batch_size=16 if gpu else 8, eval_every=100,
        save_every=1000, log_every=25, report_to=["tensorboard"]), overwrite=True, log=log)

    log("[3/5] sft: fine-tune it into a chat assistant on the demo dialogues")
    chat = sft(SFTConfig(model=str(out / "base"), data=data, out=str(out / "chat"), epochs=30,
                         max_time=cfg.sft_seconds or 180, learning_rate=1e-3, eval_every=100,
                         save_every=1000, log_every=25, report_to=["tensorboard"]), overwrite=True, log=log)

    log("[4/5] a sample conversation (greedy decoding)")
    engine = Engine(str(out / "chat"))
    params = SamplingParams(max_new_tokens=40, temperature=0.0, repetition_penalty=1.1)
    for prompt in SAMPLE_PROMPTS.get(cfg.lang, SAMPLE_PROMPTS["en"]):
        answer = engine.complete(engine.chat_prompt([{"role": "user", "content": prompt}]), params).text
        log(f"  user: {prompt}\n  assistant: {answer}")
    engine.close()
    report = evaluate_and_report(out, log)
    minutes = (time.time() - started) / 60
    log(f"\ndone in {minutes:.1f} min: base val loss {base.get('eval_loss')}, bits/byte {base.get('eval_bpb')}; "
        f"chat eval loss {chat.get('eval_loss')}\n"
        f"chat with it:   chatforge chat {out / 'chat'}\n"
        f"serve it:       chatforge serve {out / 'chat'}   (then open http://127.0.0.1:8000)\n"
        f"training curves: tensorboard --logdir {out}" + (f"\nreport:          {report}" if report else ""))
    return {"base": base, "chat": chat, "minutes": round(minutes, 2), "report": report}


def evaluate_and_report(out: Path, log=print) -> str | None:
    """Both models on the built-in eval suite (seconds), then report.md with plots and model cards."""
    from chatforge.eval.run import EvalConfig, evaluate, lm_eval_installed
    from chatforge.report import ReportConfig, write_report

    models = [str(out / "base"), str(out / "chat")]
    if lm_eval_installed():
        log("[5/5] eval on the built-in suite, and a report")
        evaluate(EvalConfig(models=models, tasks=["builtin"], out=str(out / "eval")), log=log)
    else:  # lm-eval is an optional extra
        log("[5/5] a report (no eval: `pip install 'chatforge[eval]'` adds it)")
    return write_report(ReportConfig(runs=models, out=str(out)), log=log)["report"]
