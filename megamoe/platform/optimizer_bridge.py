"""Optimizer-side CPU patches.

- `clip_grad_by_total_norm_fp32` asserts `grad.type() == 'torch.cuda.FloatTensor'`: megamoe's
  version accepts fp32 CPU grads and scales them the same way.
- `DistributedOptimizer._build_model_and_main_param_groups` dispatches on `param.type()` being
  one of the `torch.cuda.*Tensor` names and raises `TypeError` for CPU params: the wrapper
  presents CPU params under the CUDA type name for the duration of that one call.
"""

from __future__ import annotations

import functools

import torch

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Scale the gradients in place by max_norm / total_norm when that is below 1."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    for g in grads:
        assert g.dtype in (torch.float32, torch.bfloat16), g.dtype
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)


def _with_cuda_type_names(build):
    @functools.wraps(build)
    def wrapper(cls, gbuf_ranges, param_gbuf_map, opt_group_ranges, config, *args, **kwargs):
        params = [p for group in opt_group_ranges for p in group["params"]]
        for p in params:
            if p.device.type == "cpu" and p.dtype in _CUDA_TYPE_NAMES:
                p.type = functools.partial(lambda name, *a, **k: name, _CUDA_TYPE_NAMES[p.dtype])
        try:
            return build(cls, gbuf_ranges, param_gbuf_map, opt_group_ranges, config, *args,
                         **kwargs)
        finally:
            for p in params:
                p.__dict__.pop("type", None)

    wrapper.__megamoe_bridge__ = True
    return wrapper


def apply() -> None:
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    assert hasattr(clip_grads, "clip_grad_by_total_norm_fp32")
    assert hasattr(optimizer, "clip_grad_by_total_norm_fp32"), "optimizer.clip_grad... moved"
    optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32

    cls = distrib_optimizer.DistributedOptimizer
    original = cls.__dict__["_build_model_and_main_param_groups"]
    assert isinstance(original, classmethod), "DistributedOptimizer._build_model_and_main_param_groups changed"
    if not getattr(original.__func__, "__megamoe_bridge__", False):
        cls._build_model_and_main_param_groups = classmethod(_with_cuda_type_names(original.__func__))
