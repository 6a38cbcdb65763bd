"""SFT end to end: template, masking, stopping and decoding agree, measured by answer recall and stop rate."""

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorWithFlattening, GPT2Config,
                          GPT2LMHeadModel, PreTrainedTokenizerFast)

from chatforge import cli
from chatforge.engine import Engine, SamplingParams
from chatforge.train.sft import encode_conversation
from conftest import run_cli

QA = Path(__file__).parent / "data" / "qa.jsonl"


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, base_model_dir) -> str:
    out = tmp_path_factory.mktemp("sft") / "chat"
    run_cli("sft", "--model", base_model_dir, "--data", QA, "--out", out, "--max-steps", 150,
            "--learning-rate", 3e-3, "--eval-fraction", 0, "--report-to", "none")
    return str(out)


def test_sft_teaches_answers_and_stopping(chat_model_dir, capsys):
    conversations = [json.loads(line)["messages"] for line in QA.read_text(encoding="utf-8").splitlines()]
    recalled = 0
    for messages in conversations:
        capsys.readouterr()
        cli.main(["chat", chat_model_dir, "--prompt", messages[0]["content"], "--temperature", "0",
                  "--max-new-tokens", "48"])
        recalled += capsys.readouterr().out.strip() == messages[1]["content"]
    engine = Engine(chat_model_dir)
    stopped = 0
    for messages in conversations:
        done = engine.complete(engine.chat_prompt(messages[:1]), SamplingParams(max_new_tokens=48, temperature=0))
        stopped += done.finish_reason == "stop"
    recall, stop_rate = recalled / len(conversations), stopped / len(conversations)
    print(f"answer recall {recall:.0%}, stop rate {stop_rate:.0%} over {len(conversations)} questions")
    assert recall >= 0.9 and stop_rate >= 0.95


def test_chat_model_is_a_plain_hf_directory(chat_model_dir):
    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    model = AutoModelForCausalLM.from_pretrained(chat_model_dir)
    eos = model.generation_config.eos_token_id
    assert tok.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])
    assert (Path(chat_model_dir) / "run_config.yaml").exists()


def test_foreign_base_without_chat_template(tmp_path):
    """A transformers model whose tokenizer has no ChatML tokens or template: sft adds both."""
    texts = [f"sentence number {i} about cats and dogs" for i in range(200)]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")
    base = tmp_path / "foreign"
    tok.save_pretrained(base)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2)).save_pretrained(base)
    assert not AutoTokenizer.from_pretrained(base).chat_template

    run_cli("sft", "--model", base, "--data", QA, "--out", tmp_path / "out", "--max-steps", 3, "--report-to", "none")
    saved = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert saved.chat_template and "{% generation %}" in saved.chat_template
    assert len(saved.encode("<|im_end|>", add_special_tokens=False)) == 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.get_input_embeddings().weight.shape[0] >= len(saved)
    # the same as a LoRA adapter: its embedding rows (64, the chat tokens added) are not the base's (len(tok))
    run_cli("sft", "--model", base, "--data", QA, "--out", tmp_path / "lora", "--lora", "--max-steps", 2,
            "--report-to", "none")
    assert run_cli("generate", tmp_path / "lora", "--prompt", "cats", "--max-new-tokens", 4).stdout.startswith("cats")


def test_context_window_not_a_multiple_of_64(tmp_path, base_model_dir):
    """Batches are padded to a multiple of 64 only as far as the model's positions go (100 here)."""
    tok = AutoTokenizer.from_pretrained(base_model_dir)
    base = tmp_path / "ctx100"
    tok.save_pretrained(base)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=100, n_embd=32, n_layer=1, n_head=2)).save_pretrained(base)
    data = tmp_path / "long.jsonl"
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a long answer " * 30}]
    data.write_text("".join(json.dumps({"messages": turn}) + "\n" for _ in range(8)))
    run_cli("sft", "--model", base, "--data", data, "--out", tmp_path / "out", "--max-steps", 2, "--report-to", "none")
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_lora_merge_writes_full_weights(tmp_path, base_model_dir):
    out = tmp_path / "lora"
    run_cli("sft", "--model", base_model_dir, "--data", QA, "--out", out, "--lora", "--merge", "--max-steps", 3,
            "--report-to", "none")
    assert not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in model.named_parameters())
    refusal = run_cli("sft", "--model", base_model_dir, "--data", QA, "--out", tmp_path / "no", "--merge", check=False)
    assert refusal.returncode == 2
    assert "--merge merges LoRA adapters into the weights: it needs --lora" in refusal.stderr
    assert not (tmp_path / "no").exists()


def test_lora_adapter_folder_is_a_model(tmp_path, base_model_dir):
    """`sft --lora` without --merge writes an adapter; chat, generate, serve and eval load it with its base
    model, merged: greedy tokens equal transformers' generate() on PEFT's own merge."""
    from peft import AutoPeftModelForCausalLM

    adapter = tmp_path / "adapter"
    run_cli("sft", "--model", base_model_dir, "--data", QA, "--out", adapter, "--lora", "--max-steps", 3,
            "--report-to", "none")
    assert (adapter / "adapter_config.json").exists() and not (adapter / "config.json").exists()
    assert not list(adapter.glob("**/README.md"))  # PEFT's card (its base "None"): the card is `report`'s
    tok = AutoTokenizer.from_pretrained(adapter)
    model = AutoPeftModelForCausalLM.from_pretrained(adapter).merge_and_unload().eval()
    prompt = tok("熊猫吃", return_tensors="pt").input_ids
    want = tok.decode(model.generate(prompt, max_new_tokens=12, do_sample=False)[0, prompt.shape[1]:],
                      skip_special_tokens=True)  # generate() shows the end-of-text token the engine stops at
    got = run_cli("generate", adapter, "--prompt", "熊猫吃", "--temperature", 0, "--max-new-tokens", 12,
                  "--dtype", "fp32").stdout
    assert got == "熊猫吃" + want + "\n"
    run_cli("eval", adapter, "--limit", 2, "--out", tmp_path / "eval")
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["models"]


def test_packing_keeps_conversations_apart(base_model_dir):
    """The packed batch sft uses gives each conversation the logits it has alone."""
    tok = AutoTokenizer.from_pretrained(base_model_dir)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir).eval()
    conversations = [json.loads(line)["messages"] for line in QA.read_text(encoding="utf-8").splitlines()[:3]]
    examples = [encode_conversation(tok, m, 128)[0] for m in conversations]
    packed = DataCollatorWithFlattening()(examples)
    with torch.no_grad():
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        start = 0
        for example in examples:
            n = len(example["input_ids"])
            alone = model(input_ids=torch.tensor([example["input_ids"]])).logits[0]
            assert torch.allclose(together[start:start + n], alone, atol=1e-4)
            start += n


def test_sft_packing_run(tmp_path, base_model_dir):
    out = tmp_path / "packed"
    run_cli("sft", "--model", base_model_dir, "--data", QA, "--out", out, "--packing", "--max-steps", 3,
            "--report-to", "none")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["eval_loss"] > 0


def test_interactive_chat_reset_and_exit(chat_model_dir):
    proc = run_cli("chat", chat_model_dir, "--temperature", "0", "--max-new-tokens", 48,
                   input="What color is the sky?\n/reset\n熊猫吃什么？\n/exit\n")
    assert "The sky is blue." in proc.stdout and "熊猫吃竹子。" in proc.stdout
    assert "(conversation reset)" in proc.stdout


def test_history_drops_oldest_turns_but_keeps_system(chat_model_dir):
    from chatforge.chat import fit_history

    engine = Engine(chat_model_dir)  # context window: 128 tokens
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(10):
        messages += [{"role": "user", "content": f"question number {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    messages.append({"role": "user", "content": "the newest question"})
    kept, ids = fit_history(engine, messages, reserve=32)
    assert kept[0] == messages[0] and kept[-1] == messages[-1]
    assert len(kept) < len(messages) and len(ids) + 32 <= engine.context_length
    assert kept[1]["role"] == "user" and kept[1:] == messages[len(messages) - len(kept) + 1:]


def test_quickstart_chinese_end_to_end(tmp_path):
    """`--lang zh` through every stage (with short budgets: the full run is timed by hand, see README)."""
    proc = run_cli("quickstart", "--lang", "zh", "--out", tmp_path / "qs", "--pretrain-seconds", 15,
                   "--sft-seconds", 15)
    assert "user: 你好" in proc.stdout and "chatforge chat" in proc.stdout
    # it ends with the built-in eval suite (base and chat side by side) and a report with model cards
    records = json.loads((tmp_path / "qs" / "eval" / "eval.json").read_text())["models"]
    assert [Path(r["model"]).name for r in records] == ["base", "chat"] and "builtin" in records[1]["suites"]
    assert f"report:          {tmp_path / 'qs' / 'report.md'}" in proc.stdout
    assert (tmp_path / "qs" / "report.md").exists() and (tmp_path / "qs" / "chat" / "README.md").exists()
    tok = AutoTokenizer.from_pretrained(tmp_path / "qs" / "chat")
    assert tok.decode(tok.encode("你好，世界", add_special_tokens=False)) == "你好，世界"
