"""The speed switches change how fast training runs, not what it computes or saves."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from conftest import TINY, run_cli

from chatforge.data import collate_blocks
from chatforge.train.loss import chunked_lm_loss, use_fused_loss
from chatforge.train.speedups import fuse_gelu, restore_forward, use_cpu_attention, use_fp8, use_packed_sdpa


def _tiny(arch: str):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=320, n_positions=48, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    else:
        config = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48,
                             tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("num_items", [False, True])
def test_fused_loss_and_gradients_equal_transformers(arch, num_items):
    stock = _tiny(arch)
    fast = copy.deepcopy(stock)
    assert use_fused_loss(fast, chunk_rows=37)  # chunks that do not divide the rows
    fuse_gelu(fast)
    use_cpu_attention(fast)  # llama's grouped KV heads take the SDPA fallback
    ids = torch.randint(0, 320, (3, 48))
    labels = ids.clone()
    labels[0, :7] = -100  # ignored positions are skipped exactly as transformers does
    kw = {"num_items_in_batch": torch.tensor(100)} if num_items else {}
    losses = []
    for model in (stock, fast):
        out = model(input_ids=ids, labels=labels, **kw)
        out.loss.backward()
        losses.append(out.loss)
    assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-5), losses
    g_stock, g_fast = _grads(stock), _grads(fast)
    assert g_stock.keys() == g_fast.keys()
    for name in g_stock:
        assert torch.allclose(g_stock[name], g_fast[name], rtol=1e-4, atol=1e-5), name
    # no labels: the stock forward, logits and all; a padding mask takes SDPA
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        assert torch.allclose(stock(input_ids=ids).logits, fast(input_ids=ids).logits, atol=1e-5)
        real = mask.bool()  # padding positions attend to nothing: their logits are meaningless
        assert torch.allclose(stock(input_ids=ids, attention_mask=mask).logits[real],
                              fast(input_ids=ids, attention_mask=mask).logits[real], atol=1e-5)
    restore_forward(fast)
    assert fast.config._attn_implementation == "sdpa"


def test_compiled_chunk_loss_equals_eager():
    """With compiled blocks on a CPU each full training chunk's softmax and gradient go through inductor (one
    graph per dtype; evaluation and the short last chunk stay eager): the same loss and gradients as the eager
    chunks, with ignored rows, a confident row, in bf16 too."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 40, 16)
    hidden[0, 3] *= 40  # logits far apart: the softmax underflows in this row
    weight = torch.randn(100, 16)
    labels = torch.randint(0, 100, (2, 40))
    labels[1, :9] = -100
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    for autocast in (False, True):
        results = []
        for compiled in (False, True):
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = chunked_lm_loss(h, w, labels, chunk_rows=32, compiled=compiled)
            loss.backward()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                evaluated = chunked_lm_loss(hidden, weight, labels, chunk_rows=32, compiled=compiled)
            results.append((loss.detach(), evaluated, h.grad, w.grad))
        for eager, compiled in zip(*results):
            assert torch.allclose(eager, compiled, rtol=1e-5, atol=1e-6), (autocast, eager, compiled)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # the full chunks, fp32 and bf16
    torch._dynamo.reset()


def test_chunked_loss_bf16_autocast_close():
    hidden = torch.randn(2, 40, 16, requires_grad=True)
    weight = torch.randn(100, 16, requires_grad=True)
    labels = torch.randint(0, 100, (2, 40))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.cross_entropy((hidden @ weight.t())[:, :-1].float().reshape(-1, 100),
                                                labels[:, 1:].reshape(-1))
        fast = chunked_lm_loss(hidden, weight, labels, chunk_rows=16)
    assert abs(ref.item() - fast.item()) < 2e-2 * abs(ref.item())


def test_chunked_loss_exact_for_a_confident_model():
    """Logits hundreds apart (probabilities that underflow to 0 in fp32): the loss and its gradient still equal
    cross-entropy's, including for a target far below the peak."""
    torch.manual_seed(0)
    hidden = (torch.randn(3, 20, 16) * 40).requires_grad_()
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 20))
    ref = torch.nn.functional.cross_entropy((hidden @ weight.t())[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1))
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    fast = chunked_lm_loss(hidden, weight, labels, chunk_rows=16)
    assert ref.item() > 100 and torch.allclose(fast, ref, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(fast, (hidden, weight)), ref_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_block_batches_match_packed_blocks(tmp_path, tokenizer_dir):
    from chatforge.data import DataConfig, PackedBlocks, prepare

    prepare(DataConfig(data=["demo:en"], out=str(tmp_path / "d"), tokenizer=tokenizer_dir), log=lambda *_: None)
    plain, fast = PackedBlocks(tmp_path / "d", "train", 64, whole_batches=False), PackedBlocks(tmp_path / "d", "train", 64)
    idx = [5, 0, len(plain) - 1, 3]
    batch = collate_blocks(fast.__getitems__(idx))
    assert set(batch) == {"input_ids", "labels"}  # no attention_mask: SDPA runs is_causal
    assert torch.equal(batch["input_ids"], torch.stack([plain[i]["input_ids"] for i in idx]))
    assert torch.equal(collate_blocks([plain[i] for i in idx])["input_ids"], batch["input_ids"])


def test_speed_options_same_loss_and_plain_checkpoints(tmp_path, tokenizer_dir):
    """Every speed switch on, `--compile` included (on a CPU: compiled blocks), against every one off."""
    from transformers import AutoModelForCausalLM

    common = ["--data", "demo:en", "--tokenizer", tokenizer_dir, *TINY, "--max-steps", 30, "--eval-every", 30,
              "--save-every", 30, "--report-to", "none", "--log-every", 10]
    fast_run = run_cli("pretrain", *common, "--out", tmp_path / "fast", "--compile")
    switches = fast_run.stdout + fast_run.stderr
    assert "2 compiled blocks" in switches and "GELU by sigmoid" in switches and "compiled chunked loss" in switches
    run_cli("pretrain", *common, "--out", tmp_path / "plain", "--no-fused-loss", "--no-fused-gelu", "--no-fast-batches",
            "--no-cpu-attention")
    assert "fused_loss: false" in (tmp_path / "plain" / "run_config.yaml").read_text()
    fast_sum = json.loads((tmp_path / "fast" / "summary.json").read_text())
    plain_sum = json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert abs(fast_sum["eval_loss"] - plain_sum["eval_loss"]) <= 0.01 * plain_sum["eval_loss"], (fast_sum, plain_sum)
    assert fast_sum["tokens_per_s"] > 0 and "first_step_s" in fast_sum

    # plain transformers loads what the fast path wrote: same files, same keys, same config
    assert (tmp_path / "fast" / "checkpoint-30" / "chatforge_complete.json").exists()
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "fast").eval()
    ckpt = AutoModelForCausalLM.from_pretrained(tmp_path / "fast" / "checkpoint-30").eval()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    assert final.state_dict().keys() == plain.state_dict().keys()
    fast_cfg = json.loads((tmp_path / "fast" / "config.json").read_text())
    plain_cfg_json = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert fast_cfg == plain_cfg_json
    assert sorted(p.name for p in (tmp_path / "fast").iterdir() if p.is_file()) == \
        sorted(p.name for p in (tmp_path / "plain").iterdir() if p.is_file())
    ids = torch.randint(0, 1000, (2, 32))
    with torch.no_grad():
        a, b, c = final(input_ids=ids).logits, ckpt(input_ids=ids).logits, plain(input_ids=ids).logits
    assert torch.equal(a, b)  # checkpoint-30 and the final directory hold the same weights
    # same init, same data order: the two runs differ only by bf16 rounding
    assert (a.softmax(-1) - c.softmax(-1)).abs().max() < 0.05


def test_compile_is_on_by_default_for_wide_cpu_runs(monkeypatch, capsys):
    """Without --compile / --no-compile a bf16 CPU run compiles its blocks from 384 wide, where it pays, and
    only when inductor's C++ compiler is installed; `--no-compile` and `--compile` both parse."""
    from chatforge.cli import main
    from chatforge.train.speedups import compile_by_default

    if torch.cuda.is_available():
        pytest.skip("the default is for CPU runs")
    monkeypatch.setenv("CXX", sys.executable)  # any executable stands in for the compiler
    assert compile_by_default(384, True, "bf16") and not compile_by_default(192, True, "bf16")
    assert not compile_by_default(384, True, "fp32")  # no native bf16: no gain measured
    assert not compile_by_default(384, single_process=False, precision="bf16")  # DDP / FSDP: only when asked
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert not compile_by_default(384, True, "bf16")
    for flag in ("--compile", "--no-compile"):
        with pytest.raises(SystemExit) as done:  # parsed, then refused for the missing data
            main(["pretrain", "--data", "/nonexistent/corpus", "--out", "/nonexistent/out", flag])
        err = capsys.readouterr().err
        assert done.value.code == 2 and "/nonexistent/corpus" in err and "unrecognized" not in err, err


def test_fused_forward_compiles_without_graph_breaks():
    """`--compile` compiles the whole model: the fused-loss training forward is one graph."""
    model = _tiny("gpt2")
    use_fused_loss(model, chunk_rows=40)
    fuse_gelu(model)
    ids = torch.randint(0, 320, (2, 48))
    explained = torch._dynamo.explain(model.forward)(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(94))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_compiled_blocks_compile_one_graph_for_every_layer():
    """`--compile` on a CPU (compiled blocks): one graph serves every layer in training. A cache handed to
    the blocks made dynamo compile a graph per layer, and past 8 layers' worth fall back to eager with a
    warning (seen at 6 layers once evaluation compiled its own)."""
    from torch._dynamo.utils import counters

    from chatforge.train.speedups import compile_blocks

    if torch.cuda.is_available():
        pytest.skip("compiled blocks are the CPU path")
    model = _tiny("gpt2")
    model.config.use_cache = False  # as the Trainer sets it
    use_fused_loss(model, chunk_rows=40)
    use_cpu_attention(model)
    torch._dynamo.reset()
    counters.clear()
    assert compile_blocks(model) == 2
    ids = torch.randint(0, 320, (2, 48))
    for _ in range(2):
        model(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(94)).loss.backward()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    torch._dynamo.reset()


def test_sigmoid_gelu_is_gpt2s_gelu():
    """Compiled blocks on a CPU run GPT-2's tanh GELU as x * sigmoid(2z): the same values and gradients as
    transformers' own GELU, eagerly and compiled, in the tails too; `restore_forward` puts the fused
    tanh kernel back."""
    from transformers.activations import NewGELUActivation

    from chatforge.train.speedups import SigmoidGELU

    x = torch.cat([torch.linspace(-30, 30, 4001), torch.randn(4000) * 3]).requires_grad_()
    reference = NewGELUActivation()(x)
    (grad_ref,) = torch.autograd.grad(reference.sum(), x)
    fused = torch.nn.GELU(approximate="tanh")(x.detach().bfloat16()).float()
    for gelu in (SigmoidGELU(), torch.compile(SigmoidGELU())):
        y = gelu(x)
        (grad,) = torch.autograd.grad(y.sum(), x)
        assert torch.allclose(y, reference, rtol=1e-5, atol=1e-6) and torch.isfinite(grad).all()
        assert torch.allclose(grad, grad_ref, rtol=1e-4, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 in, bf16 out: torch's kernel to one unit
            y16 = gelu(x.detach().bfloat16())
        assert y16.dtype == torch.bfloat16 and torch.allclose(y16.float(), fused, rtol=2 ** -7, atol=1e-6)
    model = _tiny("gpt2")
    assert fuse_gelu(model, compiled_cpu=True) == 2 and type(model.transformer.h[0].mlp.act) is SigmoidGELU
    restore_forward(model)
    act = model.transformer.h[0].mlp.act
    assert type(act) is torch.nn.GELU and act.approximate == "tanh"


def test_fp8_trains_close_to_bf16_and_saves_plain_checkpoints(tmp_path):
    """`--fp8` (torchao Float8Linear; emulated on a CPU, the same conversion a GPU runs): the parameters and
    the saved checkpoint are the stock model's, and a few training steps track the bf16 run."""
    pytest.importorskip("torchao.float8")
    from transformers import AutoModelForCausalLM

    plain, fp8 = _tiny("llama"), _tiny("llama")  # same seed: same weights
    assert use_fp8(fp8) == 14  # q, k, v, o, gate, up, down in 2 layers; never the LM head
    assert type(fp8.lm_head) is torch.nn.Linear and type(fp8.model.layers[0].mlp.up_proj) is not torch.nn.Linear
    assert {k: v.shape for k, v in fp8.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    ids = torch.randint(0, 320, (4, 48), generator=torch.Generator().manual_seed(0))
    losses = {}
    for name, model in (("plain", plain), ("fp8", fp8)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(6):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        losses[name] = loss.item()
    assert losses["fp8"] < 5.5 and abs(losses["fp8"] - losses["plain"]) < 0.05 * losses["plain"], losses  # ln 320 = 5.77
    fp8.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    saved = loaded.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in fp8.state_dict().items())


def test_packed_sdpa_gets_no_mask_even_compiled():
    """`--fast-batches` batches have no padding: SDPA must get `is_causal=True`, not a T x T mask, also
    under torch.compile (where transformers otherwise builds one) and with the fused loss; a padded batch
    still gets its mask."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from chatforge.train.speedups import PACKED_SDPA

    model = _tiny("gpt2")
    use_packed_sdpa(model)
    masks = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        masks.append(None if attention_mask is None else tuple(attention_mask.shape))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    ids = torch.randint(0, 320, (2, 48))
    padded = torch.ones_like(ids)
    padded[:, :3] = 0
    try:
        AttentionInterface.register(PACKED_SDPA, spy)
        model(input_ids=ids, labels=ids)
        assert masks[-1] is None
        model(input_ids=ids, attention_mask=padded)
        assert masks[-1] == (2, 1, 48, 48)
        torch._dynamo.reset()
        torch.compile(model, backend="aot_eager")(input_ids=ids, labels=ids)
        assert masks[-1] is None
        use_fused_loss(model)  # the fused forward too (it once ran without a cache: transformers then masked)
        model.config.use_cache = False  # as the Trainer sets it
        model(input_ids=ids, labels=ids)
        assert masks[-1] is None
        torch._dynamo.reset()
        torch.compile(model, backend="aot_eager")(input_ids=ids, labels=ids)
        assert masks[-1] is None
    finally:
        torch._dynamo.reset()
        AttentionInterface.register(PACKED_SDPA, sdpa_attention_forward)


def test_fp32_muon_steps_as_torch_muon():
    """The Muon for CPUs without native bf16 (Newton-Schulz in fp32) takes torch's Muon's steps up to bf16
    rounding, keeps the same state, and each class loads the other's checkpoint."""
    from chatforge.train.common import Fp32Muon

    torch.manual_seed(0)
    start = [torch.randn(48, 16), torch.randn(16, 64)]  # tall and wide, as c_fc / c_proj
    grads = [[torch.randn_like(w) for w in start] for _ in range(4)]
    runs = {}
    for cls in (torch.optim.Muon, Fp32Muon):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        opt = cls(params, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        runs[cls] = params, opt
    (ours, ours_opt), (theirs, theirs_opt) = runs[Fp32Muon], runs[torch.optim.Muon]
    for a, b, w in zip(ours, theirs, start):
        moved = (b - w).abs().max()
        assert moved > 0.01 and (a - b).abs().max() < 0.05 * moved
    state = theirs_opt.state_dict()
    assert state["state"].keys() == ours_opt.state_dict()["state"].keys()
    ours_opt.load_state_dict(state)
    theirs_opt.load_state_dict(runs[Fp32Muon][1].state_dict())
