"""The DeepSpeed bridge names call sites in DeepSpeed 0.19; these tests fail when a patched name
moves or stops needing the patch, and the config refuses what the DeepSpeed engine cannot run."""

import importlib
import inspect

import os

import pytest

# CI installs deepspeed (scripts/test.sh): there a missing package fails, it is not skipped
_ds = (__import__("deepspeed") if os.environ.get("CI")
       else pytest.importorskip("deepspeed"))

from megamoe.config import ConfigError, load_config  # noqa: E402
from megamoe.models.checks import check_config  # noqa: E402
from megamoe.platform import deepspeed_bridge as bridge  # noqa: E402


def test_deepspeed_version_is_pinned():
    assert bridge.deepspeed_version().startswith(bridge.SUPPORTED_DEEPSPEED)


@pytest.mark.parametrize("module,attr", bridge.PATCHED)
def test_patched_name_exists(module, attr):
    assert hasattr(importlib.import_module(module), attr), f"{module}.{attr} moved"


def test_engine_finds_moe_layers_only_by_its_own_class():
    """The reason for `moe_visible`: the one isinstance check that sets has_moe_layers."""
    from deepspeed.runtime import engine

    src = inspect.getsource(engine.DeepSpeedEngine._configure_distributed_model)
    assert "isinstance(module, MoE)" in src and "self.has_moe_layers = True" in src
    assert "module.num_experts" in src


def test_moe_visible_counts_the_given_class_and_restores_the_name():
    import torch

    from deepspeed.moe.layer import MoE
    from deepspeed.runtime import engine

    class Layer(torch.nn.Module):
        pass

    layer = Layer()
    with bridge.moe_visible(Layer, [layer], 8):
        assert isinstance(layer, engine.MoE) and layer.num_experts == 8
    assert engine.MoE is MoE and not isinstance(layer, engine.MoE)


def test_expert_parameters_are_recognised_by_allreduce_false():
    """Megatron marks expert-parallel weights `allreduce=False`: DeepSpeed's test of an expert
    parameter, which then needs the group name the engine sets."""
    import torch

    from deepspeed.moe.utils import is_moe_param

    p = torch.nn.Parameter(torch.zeros(2))
    assert not is_moe_param(p)
    p.allreduce = False
    assert is_moe_param(p)


def test_comm_backend_builds_the_shared_memory_op_at_construction():
    """The reason for `init_comm`: constructing the backend JIT-compiles that op on CPU."""
    ds_torch = importlib.import_module("deepspeed.comm.torch")

    assert "build_shm_op()" in inspect.getsource(ds_torch.TorchBackend.__init__)
    assert "builder.load()" in inspect.getsource(ds_torch.build_shm_op)


def test_zero_optimizer_hooks_the_engine_relies_on():
    """Names of DeepSpeed's ZeRO 1/2 optimizer the engine and its state code use."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer as Z

    assert "external_loss_scale" in inspect.getsource(Z.override_loss_scale)
    link = inspect.getsource(Z._lazy_init_hp_params_optimizer_state)
    assert "_hp_optimizer_states_linked" in link
    # expert gradients in a bucket are divided by the dense DP size, as Megatron does
    assert "tensor.div_(dist.get_world_size(group=self.dp_process_group)" in inspect.getsource(
        Z.average_tensor)


def _cfg(*overrides):
    cfg = load_config(None, ["parallel.world_size=4", "train.engine=deepspeed", *overrides])
    check_config(cfg, launch=False)
    return cfg


def test_tensor_or_pipeline_parallelism_is_one_error_naming_the_fields():
    for extra in (["parallel.tensor=2"], ["parallel.pipeline=2", "model.num_layers=4"]):
        with pytest.raises(ConfigError) as err:
            _cfg(*extra)
        msg = str(err.value)
        assert msg.startswith("train.engine:") and "parallel.tensor=" in msg
        assert "parallel.pipeline=" in msg and "\n" not in msg


def test_distributed_optimizer_and_zero_3_are_refused():
    with pytest.raises(ConfigError, match="^parallel.distributed_optimizer:"):
        _cfg("parallel.distributed_optimizer=true")
    with pytest.raises(ConfigError, match="^train.zero_stage:"):
        _cfg("train.zero_stage=3")
    assert _cfg("parallel.expert=2").train.zero_stage == 1
