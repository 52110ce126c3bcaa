"""FP8 experts on CUDA (skipped without a GPU): the rowwise grouped back end
(`torch._scaled_grouped_mm`) and the per-expert `torch._scaled_mm` back end agree with the CPU
emulation of the same recipe; CUDA's rowwise kernels round their output to bf16, hence 1e-2."""

import pytest
import torch

from megamoe.fp8 import FP8Call, FP8ScalingState, fp8_grouped_linear, make_recipe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

COUNTS = [32, 0, 64, 16]


def _run(fn, recipe, x, w, g):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn(x, w, COUNTS, FP8Call(recipe, FP8ScalingState(len(COUNTS)), 0))
    y.backward(g)
    return [t.detach().float().cpu() for t in (y, x.grad, w.grad)]


@pytest.mark.parametrize("backend", ["scaled_grouped_mm", "scaled_mm"])
def test_cuda_back_end_matches_cpu(backend):
    from megamoe.fp8.grouped import fp8_scaled_grouped_linear

    recipe = make_recipe("rowwise")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(sum(COUNTS), 64, generator=gen)
    w = torch.randn(len(COUNTS), 128, 64, generator=gen) * 0.1
    g = torch.randn(sum(COUNTS), 128, generator=gen)
    cpu = _run(fp8_grouped_linear, recipe, x, w, g)
    fn = fp8_scaled_grouped_linear if backend == "scaled_grouped_mm" else fp8_grouped_linear
    gpu = _run(fn, recipe, x.cuda(), w.cuda(), g.cuda())
    for a, b in zip(gpu, cpu):
        assert ((a - b).norm() / b.norm()).item() < 1e-2
    assert (gpu[2][1] == 0).all()
