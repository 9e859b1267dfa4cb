"""Float8 training matmuls through torchao (model/float8.py), on the CPU, where torch's `_scaled_mm` emulates the
hardware's float8 matmul: the projection against a float64 reference within float8's rounding (and visibly not
exact, so the float8 path did run), slices reaching the whole weight's gradient, evaluation left exact, a training
run that learns and resumes exactly, and the start-up errors."""

import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import straight_and_resumed_losses, tiny_config, tiny_train_config

from adamba import AdambaLM, TrainConfig
from adamba.model.float8 import check_float8, enable_float8, float8_layers, linear

CPU = torch.device("cpu")


def marked_linear(rows: int, cols: int) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(cols, rows, bias=True)
    host = nn.Module()  # enable_float8 marks the layers of model.blocks
    host.blocks = nn.ModuleList([nn.Module()])
    host.blocks[0].mlp = nn.Module()
    host.blocks[0].mlp.c_fc = layer
    enable_float8(host, "tensorwise", CPU)
    return layer


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_a_sliced_projection_in_float8_is_the_float64_product_within_float8_rounding():
    layer = marked_linear(96, 128)
    x = torch.randn(4, 8, 64, requires_grad=True)
    out = linear(x, layer, 80, 64)  # a Matryoshka slice: the first 80 rows, 64 columns
    weight, bias = layer.weight.detach().double(), layer.bias.detach().double()
    reference = x.detach().double() @ weight[:80, :64].T + bias[:80]
    # e4m3 keeps 3 mantissa bits: each factor is off by up to 2^-4 relatively, the sum of 64 products much less
    assert 1e-4 < relative(out, reference) < 0.05
    grad = torch.randn_like(out)
    out.backward(grad)
    g = grad.double().reshape(-1, 80)
    assert 1e-4 < relative(layer.weight.grad[:80, :64], g.T @ x.detach().double().reshape(-1, 64)) < 0.08
    assert torch.count_nonzero(layer.weight.grad[80:]) == 0 and torch.count_nonzero(layer.weight.grad[:, 64:]) == 0
    assert 1e-4 < relative(x.grad, (g @ weight[:80, :64]).reshape(x.shape)) < 0.08


def test_the_whole_projection_equals_torchaos_own_float8_linear():
    """adamba's slice-aware path against torchao's module swap (Float8Linear), forward and gradients, bit for bit."""
    import copy

    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    layer = marked_linear(96, 128)
    theirs = nn.Sequential(copy.deepcopy(layer))
    del theirs[0].float8
    convert_to_float8_training(theirs, config=Float8LinearConfig.from_recipe_name("tensorwise"))
    assert type(theirs[0]).__name__ == "Float8Linear"
    x = torch.randn(5, 128, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    mine, reference = linear(x, layer), theirs(x2)
    torch.testing.assert_close(mine, reference, atol=0, rtol=0)
    grad = torch.randn_like(mine)
    mine.backward(grad), reference.backward(grad)
    torch.testing.assert_close(layer.weight.grad, theirs[0].weight.grad, atol=0, rtol=0)
    torch.testing.assert_close(x.grad, x2.grad, atol=0, rtol=0)


def test_float8_runs_only_in_training_and_on_dimensions_that_are_multiples_of_16():
    layer = marked_linear(96, 128)
    x = torch.randn(3, 128)
    assert not torch.equal(linear(x, layer), F.linear(x, layer.weight, layer.bias))
    assert torch.equal(linear(x[:, :40], layer, 72, 40), F.linear(x[:, :40], layer.weight[:72, :40], layer.bias[:72]))
    layer.eval()
    assert torch.equal(linear(x, layer), F.linear(x, layer.weight, layer.bias))


def test_the_model_marks_its_block_projections_and_evaluates_exactly():
    config = tiny_config(block_pattern="TM")
    torch.manual_seed(0)
    model = AdambaLM.build(config)
    with torch.no_grad():  # lm_head and the output projections start at zero: random, so every matmul shows
        for layer in [*float8_layers(model), model.lm_head]:
            layer.weight.normal_(0, 0.1)
    reference = AdambaLM.build(config)
    reference.load_state_dict(model.state_dict())
    summary = enable_float8(model, "tensorwise", CPU)
    marked = [layer for layer in float8_layers(model) if hasattr(layer, "float8")]
    # by hand: attention's q, k, v, out and its MLP's two matrices (n_embd 64), Mamba's in/out projections
    names = {name for name, m in model.named_modules() if getattr(m, "float8", None) is not None}
    assert names == {"blocks.0.attn.c_q", "blocks.0.attn.c_k", "blocks.0.attn.c_v", "blocks.0.attn.c_proj",
                     "blocks.0.mlp.c_fc", "blocks.0.mlp.c_proj", "blocks.1.mixer.in_proj", "blocks.1.mixer.out_proj"}
    assert f"{len(marked)} of {len(float8_layers(model))}" in summary
    idx = torch.randint(0, config.vocab_size, (2, 32))
    model.eval(), reference.eval()
    torch.testing.assert_close(model(idx), reference(idx), atol=0, rtol=0)
    model.train(), reference.train()
    targets = torch.randint(0, config.vocab_size, (2, 32))
    loss, plain = model(idx, targets), reference(idx, targets)
    assert loss.item() != plain.item() and loss.item() == pytest.approx(plain.item(), rel=0.02)
    loss.backward()
    assert all(layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0 for layer in marked)


def test_a_float8_run_learns_and_resumes_exactly(corpus_dir, monkeypatch):
    config = tiny_config(block_pattern="TM")
    straight, resumed = straight_and_resumed_losses(config, corpus_dir, monkeypatch, kill_after=3,
                                                    float8="tensorwise", num_iterations=6, save_every=3)
    assert straight == resumed  # the scales are recomputed every call: nothing to save, nothing lost
    assert straight[6] < straight[1]


def test_start_up_errors_name_the_field_and_the_fix(monkeypatch):
    with pytest.raises(ValueError, match="float8: unknown recipe 'e4m3'"):
        TrainConfig(float8="e4m3")
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # torchao not installed
    with pytest.raises(ValueError, match=r"float8: needs torchao .*pip install 'adamba\[fp8\]'"):
        check_float8("tensorwise", CPU)
    monkeypatch.delitem(sys.modules, "torchao.float8")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match=r"float8: this GPU \(NVIDIA A100-SXM4-80GB, compute capability 8.0\) has no"):
        check_float8("tensorwise", torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_float8("tensorwise", torch.device("cuda", 0))  # an H100: accepted



def test_fine_tuning_takes_the_flag_too(corpus_dir, capsys):
    """SFT prepares its model as pretraining does (trainer.prepare_model): float8 is not silently dropped."""
    from test_sft import echo_conversations

    from adamba.config import SFT_TRAIN_DEFAULTS, SFTConfig
    from adamba.train.sft import sft
    from adamba.train.trainer import train

    train(tiny_config(), tiny_train_config(corpus_dir, run_name="base", num_iterations=1), progress=False)
    capsys.readouterr()
    config = TrainConfig.from_dict({**SFT_TRAIN_DEFAULTS, "run_name": "sft8", "device_batch_size": 2,
                                    "total_batch_size": 2 * 32, "device": "cpu", "float8": "tensorwise"})
    result = sft(SFTConfig(base="base", num_iterations=2), config, echo_conversations(16), progress=False)
    assert "float8 (tensorwise scaling, torchao): 12 of 12 block projections" in capsys.readouterr().out
    assert result.step == 2


@pytest.mark.slow  # compiling takes about 40 s on 2 CPU cores (make test-slow)
def test_compiled_float8_training_equals_eager():
    """torch.compile traces torchao's float8 matmul on the slices: the loss and gradients of the eager pass."""
    torch.manual_seed(0)
    model = AdambaLM.build(tiny_config(block_pattern="TT"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    enable_float8(model, "tensorwise", CPU)
    idx, targets = torch.randint(0, 512, (2, 32)), torch.randint(0, 512, (2, 32))
    eager = model(idx, targets)
    eager.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model)(idx, targets)
    compiled.backward()
    assert compiled.item() == pytest.approx(eager.item(), rel=1e-5)
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)
