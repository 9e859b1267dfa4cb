"""Parity of the optional CUDA kernels (mamba_ssm's selective scan and chunked SSD scan, causal_conv1d) with our
PyTorch paths, which the rest of the suite tests against sequential and float64 references.

These packages only exist on CUDA machines, so these tests run only where a GPU and the package are present
(the skip names which is missing); everywhere else the PyTorch and compiled CPU paths are tested in
test_mamba.py, test_mamba2.py and test_scan_cpu.py, and kernel detection in test_gpu_readiness.py."""

import pytest
import torch

from adamba.model import kernels
from adamba.model.mamba import Mamba
from adamba.model.mamba2 import Mamba2
from adamba.model.scan import sequential_scan
from adamba.model.ssd import ssd_chunked, ssd_sequential
from tests.test_mamba2 import ssd_inputs

# Justified skips: these kernels cannot exist without a GPU; CI has none (see the module docstring).
HAS_CUDA = torch.cuda.is_available()
FOUND = kernels.resolve() if HAS_CUDA else kernels.Kernels(None, None, None, ("no GPU",) * 3)
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.skipif(FOUND.selective_scan is None, reason=FOUND.notes[0])
def test_fused_scan_matches_reference():
    g = torch.Generator().manual_seed(0)
    x, dt = torch.randn(2, 300, 64, generator=g), torch.rand(2, 300, 64, generator=g) * 0.2
    A = -(torch.rand(64, 16, generator=g) + 0.1)
    B, C, D = torch.randn(2, 300, 16, generator=g), torch.randn(2, 300, 16, generator=g), torch.randn(64, generator=g)
    want_y, want_h = sequential_scan(x, dt, A, B, C, D)
    y, h = FOUND.selective_scan(*(t.cuda().transpose(1, 2).contiguous() if t.ndim == 3 else t.cuda()
                                  for t in (x, dt, A, B, C, D)), return_last_state=True)
    torch.testing.assert_close(y.transpose(1, 2).cpu(), want_y, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h.cpu(), want_h, atol=1e-4, rtol=1e-4)


@needs_cuda
@pytest.mark.skipif(FOUND.selective_scan is None and FOUND.causal_conv1d is None, reason=FOUND.notes[0])
def test_mixer_on_cuda_matches_cpu():
    torch.manual_seed(0)
    mixer = Mamba(64)
    u = torch.randn(2, 200, 64)
    torch.testing.assert_close(mixer.cuda()(u.cuda()).cpu(), mixer.cpu()(u), atol=1e-4, rtol=1e-4)


@needs_cuda
@pytest.mark.skipif(FOUND.chunk_scan is None, reason=FOUND.notes[2])
@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "continued"])
def test_mamba_chunk_scan_combined_matches_the_pytorch_ssd(with_state):
    """mamba_chunk_scan_combined against ssd_chunked and the sequential recurrence: outputs, final state and
    gradients, with 2 groups of heads, a length that is not a multiple of the chunk, and an initial state."""
    leaves = ssd_inputs(2, 300, 4, 64, 2, 16, torch.float32)
    leaves[1] = leaves[1] * 0.5
    h0 = torch.randn(2, 4, 64, 16, generator=torch.Generator().manual_seed(1)) if with_state else None
    want_y, want_h = ssd_sequential(*leaves, h0=h0)
    torch.testing.assert_close(ssd_chunked(*leaves, h0=h0, chunk_size=64)[0], want_y, atol=1e-4, rtol=1e-4)
    on_gpu = [t.cuda().requires_grad_() for t in leaves]
    y, h = FOUND.chunk_scan(*on_gpu[:5], 64, D=on_gpu[5], initial_states=None if h0 is None else h0.cuda(),
                            return_final_states=True)
    torch.testing.assert_close(y.cpu(), want_y, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(h.cpu(), want_h, atol=1e-3, rtol=1e-3)
    cpu = [t.clone().requires_grad_() for t in leaves]
    want = ssd_chunked(*cpu, h0=h0, chunk_size=64)
    g = torch.Generator().manual_seed(2)
    dy, dh = torch.randn(want[0].shape, generator=g), torch.randn(want[1].shape, generator=g)
    ((want[0] * dy).sum() + (want[1] * dh).sum()).backward()
    ((y * dy.cuda()).sum() + (h * dh.cuda()).sum()).backward()
    for name, a, b in zip("x dt A B C D".split(), on_gpu, cpu, strict=True):
        torch.testing.assert_close(a.grad.cpu(), b.grad, atol=2e-3, rtol=2e-3, msg=name)


@needs_cuda
@pytest.mark.skipif(FOUND.chunk_scan is None, reason=FOUND.notes[2])
def test_mamba2_mixer_on_cuda_matches_cpu():
    torch.manual_seed(0)
    mixer = Mamba2(128, d_state=16, headdim=32, chunk_size=64)
    u = torch.randn(2, 200, 128)
    torch.testing.assert_close(mixer.cuda()(u.cuda()).cpu(), mixer.cpu()(u), atol=1e-3, rtol=1e-3)
