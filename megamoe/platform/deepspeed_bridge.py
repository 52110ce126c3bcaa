"""What DeepSpeed 0.19 needs to train megamoe's models under ZeRO stage 1 and 2.

DeepSpeed decides that a model has MoE layers only by finding instances of its own `MoE` class
(`DeepSpeedEngine._configure_distributed_model`: `isinstance(module, MoE)`). Without that it
builds no expert groups and its ZeRO optimizer crashes on parameters Megatron marked as expert
parameters (`allreduce=False`, no `group_name`). Two pieces make it see megamoe's layers:

- `moe_visible(layer_cls, layers, num_experts)`: while `deepspeed.initialize` runs, the name
  `MoE` in `deepspeed.runtime.engine` (the one call site) is the pair (DeepSpeed's `MoE`,
  `layer_cls`), and each layer carries the `num_experts` DeepSpeed records;
- `register_groups(name, ep, expert_dp)`: megamoe's own expert-parallel and expert-data-parallel
  groups go into `deepspeed.utils.groups` under the group name the expert parameters carry, so
  DeepSpeed builds no groups of its own;
- `init_comm(backend)`: DeepSpeed's communication layer wraps the process group megamoe made,
  without building its shared-memory op (`deepspeed.comm.torch.build_shm_op`): on the CPU
  accelerator that op is JIT-compiled C++ (over 4 minutes on this machine's first run), and it
  serves only `inference_all_reduce`, which training never calls.

Pinned to DeepSpeed 0.19.x; tests/unit/test_deepspeed_patch.py fails when a patched name moves.
"""

from __future__ import annotations

import contextlib

import torch.distributed as dist

SUPPORTED_DEEPSPEED = "0.19."
PATCHED = (("deepspeed.runtime.engine", "MoE"),
           ("deepspeed.comm.torch", "build_shm_op"),
           ("deepspeed.utils.groups", "_EXPERT_PARALLEL_GROUP"),
           ("deepspeed.utils.groups", "_EXPERT_PARALLEL_GROUP_RANKS"),
           ("deepspeed.utils.groups", "_EXPERT_DATA_PARALLEL_GROUP"),
           ("deepspeed.utils.groups", "_EXPERT_DATA_PARALLEL_GROUP_RANKS"),
           ("deepspeed.utils.groups", "mpu"))


def deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__


def check_deepspeed_version() -> None:
    version = deepspeed_version()
    if not version.startswith(SUPPORTED_DEEPSPEED):
        raise RuntimeError(f"train.engine=deepspeed is pinned to deepspeed "
                           f"{SUPPORTED_DEEPSPEED}x, found {version}; "
                           f"pip install 'deepspeed>=0.19,<0.20'")


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's naming of an expert-parallel group (`ep_size_<N>`)."""
    return f"ep_size_{ep_size}"


@contextlib.contextmanager
def moe_visible(layer_cls, layers, num_experts: int):
    """Inside: DeepSpeed's engine counts `layer_cls` instances as MoE layers."""
    from deepspeed.moe.layer import MoE
    from deepspeed.runtime import engine

    assert engine.MoE is MoE, "deepspeed.runtime.engine.MoE moved"
    for layer in layers:
        layer.num_experts = num_experts       # what DeepSpeed records per MoE layer
    engine.MoE = (MoE, layer_cls)
    try:
        yield
    finally:
        engine.MoE = MoE


def init_comm() -> None:
    """deepspeed.comm over the existing default process group (once per process)."""
    import importlib

    import deepspeed.comm as ds_comm

    ds_torch = importlib.import_module("deepspeed.comm.torch")   # not deepspeed.comm's `torch`

    if ds_comm.is_initialized():
        return
    original = ds_torch.build_shm_op
    assert callable(original), "deepspeed.comm.torch.build_shm_op moved"
    ds_torch.build_shm_op = lambda: None
    try:
        ds_comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False,
                                 dist_init_required=False)
    finally:
        ds_torch.build_shm_op = original


def _ranks(group) -> list[int]:
    return dist.get_process_group_ranks(group)


def register_groups(name: str, ep_group, expert_dp_group, mpu) -> None:
    """Make megamoe's groups DeepSpeed's: the expert groups under `name` (replacing any earlier
    layout's in this process) and `mpu` for the dense data-parallel group."""
    from deepspeed.utils import groups

    for attr in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS",
                 "_EXPERT_DATA_PARALLEL_GROUP", "_EXPERT_DATA_PARALLEL_GROUP_RANKS"):
        assert isinstance(getattr(groups, attr), dict), f"deepspeed.utils.groups.{attr} moved"
        getattr(groups, attr).clear()
    groups._EXPERT_PARALLEL_GROUP[name] = ep_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = _ranks(ep_group)
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = expert_dp_group
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = _ranks(expert_dp_group)
    assert hasattr(groups, "mpu"), "deepspeed.utils.groups.mpu moved"
    groups.mpu = mpu


class GridMpu:
    """The `mpu` interface DeepSpeed queries (Megatron's old parallel_state names) answered
    from megamoe's grid; only layouts without TP and PP reach DeepSpeed."""

    def __init__(self, grid):
        self.grid = grid

    def get_data_parallel_group(self):
        return self.grid.dp

    def get_data_parallel_world_size(self) -> int:
        return self.grid.dp.size()

    def get_data_parallel_rank(self) -> int:
        return self.grid.dp.rank()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return _ranks(self.grid.dp)

    def get_model_parallel_group(self):
        return self.grid.mp

    def get_model_parallel_world_size(self) -> int:
        return self.grid.mp.size()

    def get_model_parallel_rank(self) -> int:
        return self.grid.mp.rank()

    def get_tensor_model_parallel_group(self):
        return self.grid.tp

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.grid.tp.size()

    def get_tensor_model_parallel_rank(self) -> int:
        return self.grid.tp.rank()

    def get_pipeline_model_parallel_group(self):
        return self.grid.pp

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.grid.pp.size()

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.grid.pp.rank()
