"""The CPU bridge: what Megatron-Core 0.16 needs to train on CPU ranks over gloo.

Every patch rebinds a *named* attribute of one Megatron module (never a torch global), is
applied only when the device is the CPU, and is listed in `PATCHES` so that a test can check
that each patched name still exists where we expect it (DESIGN.md, "Megatron-Core on CPU").
"""

from __future__ import annotations

import importlib
import logging
import os

import torch

from megamoe.platform.cpu_torch import CPU_TORCH

SUPPORTED_MEGATRON = "0.16."

# Modules whose module-level `torch` is rebound to CPU_TORCH: they call torch.cuda.* or pass
# device="cuda" on the paths megamoe runs (model, MoE dispatch, schedules, DDP, optimizer).
TORCH_PROXY_MODULES = (
    "megatron.core.utils",
    "megatron.core.parallel_state",
    "megatron.core.timers",
    "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.mlp",
    "megatron.core.transformer.module",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.moe.experts",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.shared_experts",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.optimizer",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.async_utils",
)


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _host_copy(tensor, as_numpy=False, record_stream=False):
    """`moe_utils.maybe_move_tensor_to_cpu` for CPU tensors: the split sizes must become host
    values (numpy), which Megatron's version only does for CUDA tensors."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


_MAPPINGS = "megatron.core.tensor_parallel.mappings"
_REPLACED: dict = {}   # (module, attribute) -> Megatron's function, kept by apply_cpu_bridge


def _gather_uneven(input_, group, output_split_sizes=None, use_global_buffer=False):
    """`mappings._gather_along_first_dim` where the ranks' row counts differ (the MoE
    dispatcher's all-gather over expert-TP once pads or dropped tokens make them uneven): gloo's
    all-gather takes equal sizes only, so each rank's rows are padded to the largest count,
    gathered, and the padding cut out."""
    if output_split_sizes is None or group.size() == 1:
        return _REPLACED[_MAPPINGS, "_gather_along_first_dim"](
            input_, group, output_split_sizes, use_global_buffer)
    most = max(output_split_sizes)
    padded = input_.new_zeros((most, *input_.shape[1:]))
    padded[:input_.shape[0]] = input_
    out = input_.new_empty((most * group.size(), *input_.shape[1:]))
    torch.distributed.all_gather_into_tensor(out, padded, group=group)
    return torch.cat([out[r * most:r * most + n] for r, n in enumerate(output_split_sizes)])


def _reduce_scatter_uneven(input_, group, input_split_sizes=None, use_global_buffer=False):
    """`mappings._reduce_scatter_along_first_dim` with uneven split sizes (the backward of the
    gather above): gloo has no list reduce-scatter, so an uneven all-to-all sends each rank the
    rows it owns from every rank, and the rank sums them (the data a reduce-scatter moves)."""
    if input_split_sizes is None or group.size() == 1:
        return _REPLACED[_MAPPINGS, "_reduce_scatter_along_first_dim"](
            input_, group, input_split_sizes, use_global_buffer)
    world, mine = group.size(), input_split_sizes[group.rank()]
    received = input_.new_empty((world * mine, *input_.shape[1:]))
    torch.distributed.all_to_all_single(
        received, input_.contiguous(), output_split_sizes=[mine] * world,
        input_split_sizes=list(input_split_sizes), group=group)
    return received.view(world, mine, *input_.shape[1:]).sum(0)


class _EmbeddingSyncTorch(type(CPU_TORCH)):
    """`torch` for Megatron's language_module on CPU: its tied-embedding set-up calls
    `weight.data.cuda()` before an all-reduce that copies the first stage's embedding into the
    last stage's output weight. megamoe initialises both copies from the same global tensor
    (models/init.py), so on CPU that step is skipped by reporting no process group there."""

    def __init__(self):
        super().__init__()
        import types

        self.distributed = types.SimpleNamespace(
            **{k: getattr(torch.distributed, k) for k in dir(torch.distributed)
               if not k.startswith("__")})
        self.distributed.is_initialized = lambda: False


LANGUAGE_MODULE = "megatron.core.models.common.language_module.language_module"

# (module, attribute, replacement or None for "set to None when missing")
FUNCTION_PATCHES = (
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state", _cpu_get_rng_state),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state", _cpu_set_rng_state),
    ("megatron.core.transformer.moe.token_dispatcher", "maybe_move_tensor_to_cpu", _host_copy),
    (_MAPPINGS, "_gather_along_first_dim", _gather_uneven),
    (_MAPPINGS, "_reduce_scatter_along_first_dim", _reduce_scatter_uneven),
)

# Names Megatron leaves undefined without Transformer Engine, which then raise NameError.
MISSING_NAME_DEFAULTS = (("megatron.core.transformer.moe.moe_utils", "te_general_gemm", None),)

_applied = False


def megatron_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def check_megatron_version() -> None:
    version = megatron_version()
    if not version.startswith(SUPPORTED_MEGATRON):
        raise RuntimeError(
            f"megamoe's CPU bridge is pinned to megatron-core {SUPPORTED_MEGATRON}x, "
            f"found {version}; install megatron-core=={SUPPORTED_MEGATRON}*"
        )


def apply_cpu_bridge() -> None:
    """Apply every CPU patch once per process. Call before building Megatron modules."""
    global _applied
    if _applied:
        return
    check_megatron_version()
    for name in TORCH_PROXY_MODULES:
        module = importlib.import_module(name)
        assert getattr(module, "torch", None) in (torch, CPU_TORCH), f"{name}.torch moved"
        module.torch = CPU_TORCH
    for name, attr, replacement in FUNCTION_PATCHES:
        module = importlib.import_module(name)
        assert hasattr(module, attr), f"{name}.{attr} moved"
        _REPLACED[name, attr] = getattr(module, attr)
        setattr(module, attr, replacement)
    language_module = importlib.import_module(LANGUAGE_MODULE)
    assert language_module.torch in (torch,) or isinstance(language_module.torch,
                                                          _EmbeddingSyncTorch)
    language_module.torch = _EmbeddingSyncTorch()
    logging.getLogger(LANGUAGE_MODULE).setLevel(logging.ERROR)
    for name, attr, default in MISSING_NAME_DEFAULTS:
        module = importlib.import_module(name)
        if not hasattr(module, attr):
            setattr(module, attr, default)
    from megamoe.platform import optimizer_bridge

    optimizer_bridge.apply()
    _applied = True


def bridge_applied() -> bool:
    return _applied


def quiet_megatron_warnings() -> None:
    """Megatron warns at import about missing Apex/TE/flask; on CPU that is expected."""
    import warnings

    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*is deprecated.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed.checkpoint")
    warnings.filterwarnings("ignore", message=".*`load_state_dict` is deprecated.*")
    warnings.filterwarnings("ignore", message=".*_all_gather_base.*is deprecated.*")
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*is deprecated.*")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    # megamoe's MoE spec passes its process groups itself; Megatron's layer warns it does not
    # know the class by name.
    logging.getLogger("megatron.core.transformer.transformer_layer").setLevel(logging.ERROR)
    # a failed checkpoint write is reported once, by megamoe's error naming path and cause
    logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async").setLevel(
        logging.CRITICAL)
