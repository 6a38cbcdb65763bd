"""What only a GPU can show (`pytest -m gpu`; skipped without CUDA): CUDA-graph decoding equals eager
decoding and generate(), seeded sampling on CUDA, SDPA's flash kernel under packed batches, FP8 training,
and the CLI stages (pretrain + resume, sft, quickstart, serve) on the device. The CPU equivalence tests
(test_engine.py, test_speed.py, ...) also run there: they use the GPU whenever one is present."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chatforge.engine import Engine, SamplingParams
from conftest import TINY, run_cli
from test_engine import PROMPTS, _random_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _generate(model, ids: list[int], n: int, stops: set[int]) -> list[int]:
    """transformers' greedy generate() on the model's own device, cut at the first stop token."""
    x = torch.tensor([ids], device=model.device)
    with torch.inference_mode():
        new = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False)[0, len(ids):]
    new = new.tolist()
    return next((new[:i] for i, t in enumerate(new) if t in stops), new)


def _together(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    reqs = [engine.submit(ids, p) for ids, p in zip(prompts, params)]
    for r in reqs:
        "".join(r)
    return [r.out for r in reqs]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cuda_graphs_equal_eager_and_generate_fp32(tmp_path, tokenizer_dir, arch):
    """fp32 (TF32 off, torch's default): graph replay, the eager step and generate() pick the same tokens,
    alone and with requests joining and leaving a batch (5 requests, 4 slots: buckets 1, 2 and 4 replay),
    across attention span buckets (a 110-token prompt decodes past position 128)."""
    path = _random_model(tmp_path / arch, tokenizer_dir, arch, ctx=320)
    graphs = Engine(path, max_batch=4, dtype="fp32")
    eager = Engine(path, max_batch=4, dtype="fp32", static=False)
    try:
        assert graphs.device == "cuda" and graphs.backend.static and graphs.backend._graphs is not None
        assert sorted(graphs.backend._graphs) == [(b, s) for b in (1, 2, 4) for s in (128, 256, 320)]
        long = (graphs.encode(" ".join(PROMPTS)) * 20)[:110]
        prompts = [graphs.encode(p) for p in PROMPTS] + [graphs.chat_prompt([{"role": "user", "content": "hi"}]), long]
        greedy = SamplingParams(max_new_tokens=40, temperature=0)
        for ids in prompts:
            want = _generate(graphs.model, ids, 40, graphs.stop_ids)
            assert graphs.complete(ids, greedy).text == eager.complete(ids, greedy).text == graphs.decode(want)
        params = [SamplingParams(max_new_tokens=40 - 5 * i, temperature=0) for i in range(len(prompts))]
        assert _together(graphs, prompts, params) == _together(eager, prompts, params)
    finally:
        graphs.close()
        eager.close()


def test_bf16_decoding_against_generate(base_model_dir):
    """bf16, the GPU default: the engine's decode step and transformers' forward use different kernels
    (fused QKV, SDPA over a masked static cache), which round differently in bf16, so greedy texts can part
    at near-ties. Teacher-forced on generate()'s own tokens, the engine must pick generate()'s token
    wherever generate()'s top-2 margin exceeds bf16's rounding; the sizes are printed."""
    engine = Engine(base_model_dir, dtype="bf16")
    try:
        assert next(engine.model.parameters()).dtype == torch.bfloat16 and engine.backend._graphs is not None
        diffs, flips, steps = [], [], 0
        for text in PROMPTS + ["The", "我们"]:
            ids = engine.encode(text)
            want = _generate(engine.model, ids, 40, set())  # no stop: 40 tokens to compare

            def teacher_forced(model, ids=ids, want=want):
                backend = engine.backend
                rows = [backend.prefill([0], [ids])[0]]
                rows += [backend.decode([t], [len(ids) + i])[0] for i, t in enumerate(want[:-1])]
                return torch.stack(rows)

            ours = engine.call(teacher_forced)
            with torch.inference_mode():
                full = torch.tensor([ids + want], device="cuda")
                theirs = engine.model(full).logits[0, len(ids) - 1:-1].float()
            diffs.append((ours - theirs).abs().max().item())
            top2 = theirs.topk(2, dim=-1).values
            margin = top2[:, 0] - top2[:, 1]
            differ = ours.argmax(-1) != theirs.argmax(-1)
            flips += margin[differ].tolist()
            steps += len(want)
        print(f"bf16 engine vs transformers, teacher-forced over {steps} steps: logits max |diff| {max(diffs):.4f}, "
              f"{len(flips)} different argmax, at top-2 margins {[round(m, 4) for m in flips]}")
        assert max(diffs) < 0.25 and all(m <= 2 * max(diffs) for m in flips)
    finally:
        engine.close()


def test_seeded_sampling_on_cuda(base_model_dir):
    """A seed gives the same text alone, again, and alongside other requests (graphs replaying)."""
    engine = Engine(base_model_dir, max_batch=4)
    try:
        ids = engine.encode(PROMPTS[1])
        p = SamplingParams(max_new_tokens=24, temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.1, seed=7)
        first = engine.complete(ids, p).text
        assert engine.complete(ids, p).text == first
        others = [SamplingParams(max_new_tokens=24, temperature=1.0) for _ in range(2)]
        texts = _together(engine, [ids, engine.encode(PROMPTS[0]), engine.encode(PROMPTS[2])], [p, *others])
        assert engine.decode(texts[0]) == first
        assert engine.complete(ids, SamplingParams(max_new_tokens=24, temperature=1.0, seed=8)).text != first
    finally:
        engine.close()


@pytest.mark.parametrize("compiled", [False, True])
def test_packed_batches_run_on_the_flash_kernel(compiled):
    """--fast-batches: SDPA gets is_causal and no mask, so its FlashAttention kernel can run it. With only
    that kernel allowed, a masked call would raise; forward and backward must run, compiled or not."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import GPT2Config, GPT2LMHeadModel

    from chatforge.train.loss import use_fused_loss
    from chatforge.train.speedups import flash_attention_implementation, fuse_gelu, use_packed_sdpa

    try:
        import flash_attn  # noqa: F401
        have_fa = True
    except ImportError:
        have_fa = False
    assert (flash_attention_implementation() is not None) == have_fa
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=256, n_embd=128, n_layer=2, n_head=2)).cuda()
    use_packed_sdpa(model)
    use_fused_loss(model)  # pretrain's switches, as `--compile` runs them
    fuse_gelu(model)
    run = torch.compile(model) if compiled else model
    ids = torch.randint(0, 512, (4, 256), device="cuda")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.autocast("cuda", dtype=torch.bfloat16):
        loss = run(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and model.transformer.h[0].attn.c_attn.weight.grad is not None


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_pretrain_compiled_and_resumed(tmp_path, base_model_dir, tokenizer_dir):
    """`pretrain --compile` on the GPU: bf16, checkpoints, peak memory; then `--resume` to more steps."""
    out = tmp_path / "run"
    args = ["--data", str(Path(base_model_dir) / "data"), "--tokenizer", tokenizer_dir, "--report-to", "none", *TINY,
            "--save-every", 20, "--eval-every", 1000, "--log-every", 10, "--out", out]
    first = run_cli("pretrain", *args, "--max-steps", 20, "--compile")
    assert "; bf16;" in first.stdout, first.stdout[-2000:]
    resumed = run_cli("pretrain", *args, "--max-steps", 40, "--resume")
    assert "resuming from" in resumed.stdout and _summary(out)["steps"] == 40
    assert _summary(out)["peak_memory_gib"] > 0


def test_fp8_pretraining_on_llama(tmp_path, base_model_dir, tokenizer_dir):
    """`--fp8` on Llama (torchao's float8 matmuls on the GPU) trains to a loss close to the same run in bf16
    and saves a plain checkpoint."""
    pytest.importorskip("torchao.float8")
    args = ["--data", str(Path(base_model_dir) / "data"), "--tokenizer", tokenizer_dir, "--report-to", "none",
            "--arch", "llama", "--n-layer", 2, "--d-model", 128, "--n-head", 4, "--context-length", 128,
            "--max-steps", 60, "--learning-rate", 3e-3, "--eval-every", 60, "--save-every", 1000]
    run_cli("pretrain", *args, "--out", tmp_path / "bf16")
    fp8 = run_cli("pretrain", *args, "--fp8", "--out", tmp_path / "fp8")
    assert "FP8 in" in fp8.stdout
    a, b = _summary(tmp_path / "bf16")["eval_loss"], _summary(tmp_path / "fp8")["eval_loss"]
    print(f"llama 60 steps: eval loss bf16 {a:.4f}, fp8 {b:.4f}")
    assert abs(a - b) < 0.05 * a
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fp8")
    assert type(loaded.model.layers[0].mlp.up_proj) is torch.nn.Linear


def test_sft_quickstart_and_serve_on_gpu(tmp_path, base_model_dir):
    """The remaining stages on the device: a short sft, the quickstart with its GPU preset (small) and
    short budgets, and the server answering one chat request."""
    from test_serve import request, start_server, stop_server

    run_cli("sft", "--model", base_model_dir, "--data", Path(__file__).parent / "data" / "qa.jsonl",
            "--out", tmp_path / "chat", "--max-steps", 30, "--eval-fraction", 0, "--report-to", "none")
    qs = run_cli("quickstart", "--out", tmp_path / "qs", "--pretrain-seconds", 20, "--sft-seconds", 15)
    assert "small (~30M)" in qs.stdout and (tmp_path / "qs" / "report.md").exists()
    assert json.loads((tmp_path / "qs" / "base" / "config.json").read_text())["n_layer"] == 8
    proc, addr = start_server(str(tmp_path / "chat"), "--api-key", "k")
    try:
        status, _, body = request(addr, "POST", "/v1/chat/completions",
                                  {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}, key="k")
        assert status == 200 and body["choices"][0]["message"]["content"] is not None, body
    finally:
        stop_server(proc)
