"""`model.mor`: off by default; each mistake and each layout not supported yet is one
ConfigError naming the field to fix."""

import pytest

from megamoe.config import ConfigError, load_config
from megamoe.models.checks import check_config

ON = ["model.mor.enabled=true", "model.num_layers=8"]
EXPERT = ON + ["model.mor.allow_non_causal=true"]
TOKEN = ON + ["model.mor.router=token"]


def test_default_is_disabled_and_any_num_layers_is_fine():
    cfg = load_config(None, ["model.num_layers=7"])
    assert cfg.model.mor.enabled is False


@pytest.mark.parametrize("overrides", [
    EXPERT, TOKEN, EXPERT + ["model.mor.capacities=[1.0, 0.5, 0.5]"],
    EXPERT + ["model.mor.kv_sharing=true"], TOKEN + ["model.mor.token.balancing=loss_free"],
    ON + ["model.mor.router=token", "model.mor.sharing=cycle", "model.num_layers=6"],
    TOKEN + ["parallel.world_size=2", "parallel.expert=2"],
    TOKEN + ["parallel.world_size=2", "parallel.tensor=2", "model.moe.num_experts=0"],
    EXPERT + ["parallel.world_size=2", "parallel.tensor=2", "model.moe.num_experts=0"],
    EXPERT + ["parallel.world_size=4", "parallel.tensor=2", "parallel.expert=2",
              "model.seq_length=16", "model.mor.capacities=[1.0, 0.5, 0.25]"],
    # MoE in the pool under TP: shared MoE routers take the compact batches' pads as padding
    TOKEN + ["parallel.world_size=2", "parallel.tensor=2"],
    EXPERT + ["parallel.world_size=2", "parallel.tensor=2", "model.seq_length=16"],  # k = 16, 10, 5
    TOKEN + ["model.moe.layer_freq=2", "model.num_layers=8", "model.mor.num_recursions=3"],
    TOKEN + ["model.moe.router=modality", "data.synthetic_modalities=2"],   # VLMo, no VL layers
    TOKEN + ["data.synthetic_modalities=2"],
    TOKEN + ["parallel.world_size=2", "parallel.pipeline=2"],
    # L = 11 does not divide by 3 stages: MoR stages hold units, not layers
    TOKEN + ["model.num_layers=11", "parallel.world_size=3", "parallel.pipeline=3"],
])
def test_valid_mor_configs_load(overrides):
    cfg = load_config(None, overrides)
    check_config(cfg, launch=False)
    assert cfg.model.mor.enabled


@pytest.mark.parametrize("overrides,field", [
    (EXPERT + ["model.num_layers=7"], "model.num_layers"),                 # L − 2 = 5, N_r = 3
    (EXPERT + ["model.mor.sharing=cycle"], "model.num_layers"),            # L = 8, N_r = 3
    (EXPERT + ["model.mor.capacities=[1.0, 0.5, 0.7]"], "model.mor.capacities"),
    (EXPERT + ["model.mor.capacities=[1.0, 1.5, 0.5]"], "model.mor.capacities"),
    (EXPERT + ["model.mor.capacities=[1.0, 0.5]"], "model.mor.capacities"),
    (EXPERT + ["model.mor.capacities=[0.5, 0.5, 0.0]"], "model.mor.capacities"),
    (TOKEN + ["model.mor.capacities=[1.0, 0.5, 0.5]"], "model.mor.capacities"),
    (EXPERT + ["model.mor.capacities=[0.9, 0.5, 0.5]", "model.mor.kv_sharing=true"],
     "model.mor.kv_sharing"),
    (ON, "model.mor.router"),                                              # expert, no opt-in
    (EXPERT + ["model.mor.router=depth"], "model.mor.router"),
    (EXPERT + ["model.mor.sharing=ring"], "model.mor.sharing"),
    (EXPERT + ["model.mor.num_recursions=0"], "model.mor.num_recursions"),
    (EXPERT + ["model.mor.alpha=0"], "model.mor.alpha"),
    (EXPERT + ["model.mor.gating=sum"], "model.mor.gating"),
    (TOKEN + ["model.mor.token.balancing=none"], "model.mor.token.balancing"),
    # pipeline stages hold whole units: first layer, recursion block, last layer
    (TOKEN + ["parallel.world_size=4", "parallel.pipeline=4"], "parallel.pipeline"),
    (TOKEN + ["model.mor.sharing=cycle", "model.num_layers=6", "parallel.world_size=2",
              "parallel.pipeline=2"], "parallel.pipeline"),                 # the block only
    (TOKEN + ["parallel.world_size=2", "parallel.pipeline=2", "parallel.virtual_pipeline=2",
              "train.global_batch_size=8"], "parallel.virtual_pipeline"),
    (TOKEN + ["model.moe.router=soft"], "model.moe.router"),
    (TOKEN + ["data.synthetic_timesteps=true"], "data.synthetic_timesteps"),
    (TOKEN + ["model.moe.router=modality", "model.moe.modality.vl_ffn_layers=2"],
     "model.moe.modality.vl_ffn_layers"),
    # L = 8, N_r = 2: K = 3, unrolled layers 1 and 4 share pool slot 1 but differ
    (TOKEN + ["model.mor.num_recursions=2", "model.moe.layer_freq=2"], "model.moe.layer_freq"),
])
def test_mistakes_and_unsupported_layouts_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        check_config(load_config(None, overrides), launch=False)
    assert str(err.value).startswith(f"{field}:"), str(err.value)
