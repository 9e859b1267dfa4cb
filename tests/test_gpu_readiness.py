"""What a CPU can check of the GPU paths: devices under torchrun, kernel detection, float32 scans under autocast,
per-device RNG on resume, the MFU peaks, and the config values the CUDA kernels reject. Device calls are mocked
where a GPU would be needed; nothing here touches CUDA."""

import random
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from adamba import AdambaLM, TrainConfig
from adamba.checkpoint import restore_rng_state, rng_state
from adamba.common import DistInfo, pick_device, pick_dtype
from adamba.model import kernels
from adamba.model.cache import InferenceCache
from adamba.model.mamba import Mamba
from adamba.model.scan import sequential_scan
from adamba.model.ssd import ssd_chunked, ssd_sequential
from adamba.train.trainer import peak_flops_of


@pytest.fixture
def fake_gpus(monkeypatch):
    """torch believes it has two GPUs; the RNG calls are recorded instead of run."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([device.index]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append(("one", state, device)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: calls.append(("all", states)))
    return calls


def test_cuda_under_torchrun_means_the_local_rank_gpu(fake_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert pick_device("cuda") == torch.device("cuda", 1)
    assert pick_device("auto") == torch.device("cuda", 1)
    assert pick_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is kept


def test_cuda_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")  # justified: the error is for machines without one (CI's)
    with pytest.raises(ValueError, match="device: cuda"):
        pick_device("cuda")


def test_bf16_is_refused_where_it_is_only_emulated_and_fp16_training_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    gpu = torch.device("cuda", 0)
    assert pick_dtype("auto", gpu) == torch.float32
    with pytest.raises(ValueError, match="dtype: bfloat16 is only emulated on Tesla V100"):
        pick_dtype("bfloat16", gpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert pick_dtype("auto", gpu) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype: float16 training needs loss scaling"):
        TrainConfig(dtype="float16")


@pytest.mark.parametrize(("name", "tflops"), [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
    ("NVIDIA H200 NVL", 835), ("NVIDIA GH200 480GB", 989), ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA A10", None), ("Tesla T4", None)])
def test_peak_flops_by_gpu_name(name, tflops):
    assert peak_flops_of(name) == (None if tflops is None else tflops * 1e12)


# --- kernel detection -------------------------------------------------------------------------------------------

def _fake_module(monkeypatch, name: str, **attrs) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    monkeypatch.setitem(sys.modules, name, module)


@pytest.fixture
def mamba_ssm_without_extension(monkeypatch):
    """mamba-ssm 2.x as pip may leave it: the Python package imports, its compiled selective_scan_cuda does not."""
    for name in ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton"):
        _fake_module(monkeypatch, name)
    _fake_module(monkeypatch, "mamba_ssm.ops.selective_scan_interface", selective_scan_fn=lambda *a, **k: None,
                 selective_scan_cuda=None)
    monkeypatch.setitem(sys.modules, "selective_scan_cuda", None)  # `import selective_scan_cuda` raises ImportError
    yield
    kernels.resolve(fresh=True, log=lambda line: None)  # forget the fake for the tests that follow


def test_mamba_ssm_without_its_extension_falls_back_and_says_why(mamba_ssm_without_extension):
    lines = []
    found = kernels.resolve(fresh=True, log=lines.append)
    assert found.selective_scan is None
    assert len(lines) == 1 and "Mamba-1 scan: PyTorch" in lines[0] and "selective_scan_cuda" in lines[0]
    assert kernels.resolve(log=lines.append) is found and len(lines) == 1  # resolved once


def test_mamba_ssm_with_its_extension_is_used(mamba_ssm_without_extension, monkeypatch):
    _fake_module(monkeypatch, "selective_scan_cuda", fwd=lambda *a: None)
    found = kernels.resolve(fresh=True, log=lambda line: None)
    assert found.selective_scan is not None and found.notes[0] == "Mamba-1 scan: mamba_ssm selective_scan_fn"


def test_kernel_facing_configs_fail_on_cuda_naming_the_field():
    present = kernels.Kernels(lambda: None, lambda: None, lambda: None, ("", "", ""))
    absent = kernels.Kernels(None, None, None, ("", "", ""))
    gpu = torch.device("cuda", 0)
    wide_conv = tiny_config(block_pattern="TM", mamba_d_conv=5)
    with pytest.raises(ValueError, match="mamba_d_conv: 5, but causal_conv1d"):
        kernels.check_config(wide_conv, gpu, present)
    with pytest.raises(ValueError, match="mamba2_d_conv: 6"):
        kernels.check_config(tiny_config(block_pattern="TM2", mamba2_d_conv=6, mamba2_headdim=16), gpu, present)
    with pytest.raises(ValueError, match="mamba_d_state: 300, but mamba_ssm's selective scan takes at most 256"):
        kernels.check_config(tiny_config(block_pattern="TM", mamba_d_state=300), gpu, present)
    kernels.check_config(wide_conv, gpu, absent)  # the PyTorch paths take any width
    kernels.check_config(wide_conv, torch.device("cpu"), present)
    AdambaLM.build(wide_conv)  # and a CPU model builds


# --- float32 scans and states under bf16 ----------------------------------------------------------------------------

def _scan_inputs(g):
    x, dt = torch.randn(2, 40, 8, generator=g), torch.rand(2, 40, 8, generator=g) * 0.3
    A = -(torch.rand(8, 4, generator=g) + 0.2)
    return x, dt, A, torch.randn(2, 40, 4, generator=g), torch.randn(2, 40, 4, generator=g), torch.randn(8, generator=g)


def _ssd_inputs(g):
    x, dt = torch.randn(2, 40, 4, 8, generator=g), torch.rand(2, 40, 4, generator=g) * 0.3
    A, D = -(torch.rand(4, generator=g) + 0.2), torch.randn(4, generator=g)
    return x, dt, A, torch.randn(2, 40, 2, 6, generator=g), torch.randn(2, 40, 2, 6, generator=g), D


@pytest.mark.parametrize("scan", [sequential_scan, ssd_sequential, lambda *a: ssd_chunked(*a, chunk_size=16)],
                         ids=["mamba1-sequential", "ssd-sequential", "ssd-chunked"])
def test_scans_compute_in_float32_under_bf16_autocast(scan):
    g = torch.Generator().manual_seed(0)
    inputs = _scan_inputs(g) if scan is sequential_scan else _ssd_inputs(g)
    want_y, want_h = scan(*inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, h = scan(*inputs)
    assert y.dtype == h.dtype == torch.float32
    torch.testing.assert_close(y, want_y, atol=1e-6, rtol=1e-6)  # bf16 matmuls would be ~1e-2 off
    torch.testing.assert_close(h, want_h, atol=1e-6, rtol=1e-6)


def test_mamba_step_sizes_keep_the_float32_bias_under_autocast(monkeypatch):
    torch.manual_seed(0)
    mixer = Mamba(32, d_state=4)
    with torch.no_grad():
        mixer.dt_proj.weight.zero_()  # then dt = softplus(bias) exactly
        mixer.dt_proj.bias.copy_(torch.linspace(-6.0, -2.0, mixer.d_inner) + 1e-3)  # not representable in bf16
    seen = {}

    def recording_scan(x, dt, *rest):
        seen["dt"] = dt
        return sequential_scan(x, dt, *rest)

    monkeypatch.setattr("adamba.model.mamba.selective_scan", recording_scan)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixer(torch.randn(1, 5, 32))
    want = F.softplus(mixer.dt_proj.bias.detach().double()).float()
    torch.testing.assert_close(seen["dt"], want.expand(1, 5, -1), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("pattern", ["TM", "TM2"])
def test_decode_ssm_state_stays_float32_with_bf16_weights(pattern):
    model = AdambaLM.build(tiny_config(block_pattern=pattern, mamba2_headdim=16, mamba2_d_state=16)).to(torch.bfloat16)
    cache = InferenceCache(model, batch=2, capacity=16)
    tokens = torch.randint(0, 512, (2, 6))
    model(tokens[:, :4], cache=cache)
    for t in range(4, 6):
        model(tokens[:, t:t + 1], cache=cache)
    state = cache.states[1]
    assert state.ssm.dtype == torch.float32 and state.conv.dtype == torch.bfloat16
    assert state.ssm.abs().sum() > 0


# --- RNG on resume ---------------------------------------------------------------------------------------------------

def test_each_rank_saves_and_restores_only_its_own_gpus_rng(fake_gpus):
    gpu1 = torch.device("cuda", 1)
    saved = rng_state(gpu1)
    assert saved["cuda"].tolist() == [1]  # this device's generator, not every visible GPU's
    random.random()
    restore_rng_state([{**saved, "cuda": torch.tensor([10])}, {**saved, "cuda": torch.tensor([11])}], gpu1,
                      DistInfo(rank=1, local_rank=1, world_size=2))
    assert [(kind, state.tolist(), device) for kind, state, device in fake_gpus] == [("one", [11], gpu1)]
    assert random.getstate() == saved["python"] and np.random.get_state()[1].tolist() == saved["numpy"][1].tolist()


def test_an_old_checkpoints_states_of_four_gpus_restore_onto_two(fake_gpus):
    old = {**rng_state(torch.device("cpu")), "cuda": [torch.tensor([i]) for i in range(4)]}  # get_rng_state_all
    restore_rng_state(old, torch.device("cuda", 1), DistInfo())
    assert [(kind, state.tolist()) for kind, state, _ in fake_gpus] == [("one", [1])]


def test_resuming_on_another_number_of_ranks_keeps_fresh_seeds(fake_gpus, capsys):
    saved = rng_state(torch.device("cpu"))
    before = torch.get_rng_state()
    restore_rng_state([saved, saved], torch.device("cpu"), DistInfo())
    assert "holds the RNG states of 2 rank(s), this run has 1" in capsys.readouterr().out
    assert torch.equal(torch.get_rng_state(), before) and not fake_gpus


# --- torch.compile ---------------------------------------------------------------------------------------------------

def _traced_ops(model, length: int) -> int:
    torch._dynamo.reset()
    tokens = torch.randint(0, 512, (1, length))
    return sum(len(ops) for ops in torch._dynamo.explain(model)(tokens, tokens).ops_per_graph)


def test_compile_keeps_the_pytorch_scan_loop_out_of_the_graph(monkeypatch):
    """With the Python-loop scan (no kernel), the traced graphs must not grow with the sequence: the loop runs
    eagerly instead of being unrolled once per time step."""
    monkeypatch.setenv("ADAMBA_SCAN_KERNEL", "0")
    model = AdambaLM.build(tiny_config(block_pattern="TM"))
    assert _traced_ops(model, 8) == _traced_ops(model, 32) > 0
    torch._dynamo.reset()
