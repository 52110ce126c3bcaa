"""Each CPU-bridge patch names a call site in Megatron-Core; these tests fail when a name moves or
stops needing the patch, so a Megatron upgrade cannot silently drop a bridge."""

import importlib
import inspect

import pytest
import torch

from megamoe.platform import bridge
from megamoe.platform.cpu_torch import CPU_TORCH, CpuTorch


def test_megatron_version_is_pinned():
    assert bridge.megatron_version().startswith(bridge.SUPPORTED_MEGATRON)


@pytest.mark.parametrize("name", bridge.TORCH_PROXY_MODULES)
def test_proxied_module_uses_cuda(name):
    module = importlib.import_module(name)
    assert getattr(module, "torch", None) in (torch, CPU_TORCH), f"{name} has no module-level torch"
    source = inspect.getsource(module)
    assert "cuda" in source, f"{name} no longer mentions cuda: drop it from TORCH_PROXY_MODULES"


@pytest.mark.parametrize("name,attr,_", bridge.FUNCTION_PATCHES)
def test_patched_function_exists(name, attr, _):
    module = importlib.import_module(name)
    assert hasattr(module, attr), f"{name}.{attr} moved"


def test_split_sizes_patch_target_only_converts_cuda():
    from megatron.core.transformer.moe import moe_utils

    src = inspect.getsource(moe_utils.maybe_move_tensor_to_cpu)
    assert "is_cuda" in src  # the reason for the patch: CPU tensors are returned unchanged


def test_clip_grads_still_asserts_cuda_type():
    from megatron.core.optimizer import clip_grads

    assert "torch.cuda.FloatTensor" in inspect.getsource(clip_grads)


def test_distributed_optimizer_still_dispatches_on_cuda_type_names():
    from megatron.core.optimizer import distrib_optimizer

    cls = distrib_optimizer.DistributedOptimizer
    assert "_build_model_and_main_param_groups" in cls.__dict__
    assert "torch.cuda.FloatTensor" in inspect.getsource(distrib_optimizer)


def test_cpu_torch_maps_cuda_devices_to_cpu():
    proxy = CpuTorch()
    assert proxy.zeros(2, device="cuda").device.type == "cpu"
    assert proxy.tensor([1.0], device=torch.device("cuda", 0)).device.type == "cpu"
    assert proxy.cuda.current_device() == torch.device("cpu")
    with proxy.cuda.stream(proxy.cuda.Stream()):
        pass
    assert proxy.float32 is torch.float32          # everything else is torch's own
    assert proxy.nn is torch.nn


def test_bridge_does_not_touch_torch_globally():
    bridge.apply_cpu_bridge()
    assert torch.zeros is not CPU_TORCH.zeros
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")          # global torch still refuses CUDA on a CPU build
    from megatron.core.transformer.moe import router

    assert router.torch is CPU_TORCH               # only the listed module sees the proxy


def test_clip_grad_replacement_scales_like_megatron():
    from megamoe.platform.optimizer_bridge import clip_grad_by_total_norm_fp32

    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=5.0)
    assert torch.allclose(p.grad, torch.tensor([0.6, 0.8, 0.0, 0.0]), atol=1e-6)
    clip_grad_by_total_norm_fp32([p], max_norm=10.0, total_norm=1.0)  # below the limit: unchanged
    assert torch.allclose(p.grad, torch.tensor([0.6, 0.8, 0.0, 0.0]), atol=1e-6)


def test_language_module_still_moves_the_tied_embedding_to_cuda():
    from megatron.core.models.common.language_module import language_module

    src = inspect.getsource(language_module.LanguageModule.setup_embeddings_and_output_layer)
    assert "weight.data.cuda()" in src and "torch.distributed.is_initialized()" in src


def test_group_reuse_patch_target_still_creates_groups():
    """megamoe.platform.group_reuse wraps the one function through which Megatron makes groups,
    with its keyword signature; Megatron's teardown destroys only the explicit-gloo side groups
    (which are not reused)."""
    import re

    from megamoe.platform import group_reuse

    module = importlib.import_module(group_reuse.PATCHED[0])
    create_group = getattr(module, group_reuse.PATCHED[1])
    params = set(inspect.signature(create_group).parameters)
    assert {"ranks", "timeout", "backend", "pg_options", "use_local_synchronization",
            "group_desc"} <= params
    assert "create_group(" in inspect.getsource(module.initialize_model_parallel)
    destroyed = re.findall(r"destroy_process_group\((\w+)\)",
                           inspect.getsource(module.destroy_model_parallel))
    assert destroyed and all(name.endswith("_GLOO") for name in destroyed), destroyed
