"""Parity of the optional CUDA kernels (mamba_ssm's selective scan, causal_conv1d) with our PyTorch path.

These packages only exist on CUDA machines, so these tests run only where a GPU and the package are present
(the skip names which is missing); everywhere else the PyTorch and compiled CPU paths are tested in
test_mamba.py and test_scan_cpu.py."""

import pytest
import torch

from adamba.model.mamba import Mamba
from adamba.model.scan import cuda_causal_conv1d, cuda_selective_scan, sequential_scan

# Justified skips: these kernels cannot exist without a GPU; CI has none (see the module docstring).
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.skipif(cuda_selective_scan() is None, reason="mamba_ssm is not installed")
def test_fused_scan_matches_reference():
    g = torch.Generator().manual_seed(0)
    x, dt = torch.randn(2, 300, 64, generator=g), torch.rand(2, 300, 64, generator=g) * 0.2
    A = -(torch.rand(64, 16, generator=g) + 0.1)
    B, C, D = torch.randn(2, 300, 16, generator=g), torch.randn(2, 300, 16, generator=g), torch.randn(64, generator=g)
    want_y, want_h = sequential_scan(x, dt, A, B, C, D)
    fused = cuda_selective_scan()
    y, h = fused(*(t.cuda().transpose(1, 2).contiguous() if t.ndim == 3 else t.cuda()
                   for t in (x, dt, A, B, C, D)), return_last_state=True)
    torch.testing.assert_close(y.transpose(1, 2).cpu(), want_y, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h.cpu(), want_h, atol=1e-4, rtol=1e-4)


@needs_cuda
@pytest.mark.skipif(cuda_selective_scan() is None and cuda_causal_conv1d() is None,
                    reason="neither mamba_ssm nor causal_conv1d is installed")
def test_mixer_on_cuda_matches_cpu():
    torch.manual_seed(0)
    mixer = Mamba(64)
    u = torch.randn(2, 200, 64)
    torch.testing.assert_close(mixer.cuda()(u.cuda()).cpu(), mixer.cpu()(u), atol=1e-4, rtol=1e-4)
