"""The family registry: `model.family` selects one record; an unknown name is one error naming
the field and the known families; the `lm` record carries what the loop and engine use."""

from types import SimpleNamespace

import pytest

from megamoe.models.registry import families, family_for


def cfg_with(family):
    return SimpleNamespace(model=SimpleNamespace(family=family))


def test_lm_is_registered_with_its_task_and_accounting():
    lm = family_for(cfg_with("lm"))
    assert lm is families()["lm"] and lm.causal and lm.unit == "token"
    assert callable(lm.build) and callable(lm.parameter_counts) and callable(lm.flops_per_unit)
    task = lm.task(SimpleNamespace(model=SimpleNamespace(seq_length=8), data=None))
    assert task.seq_length == 8 and task.units_per_sample() == 8


def test_unknown_family_is_one_error_naming_the_field():
    with pytest.raises(ValueError,
                       match=r"^model.family: unknown family 'video' \(known: dit, lm, vit, "
                             r"vlm\)$"):
        family_for(cfg_with("video"))


def test_the_megatron_engine_implements_the_protocol():
    from megamoe.engines.base import Engine
    from megamoe.engines.megatron import MegatronEngine

    for name in ("train_step", "eval_step", "after_step", "checkpoint_state",
                 "load_checkpoint_state", "modules"):
        assert hasattr(MegatronEngine, name), name
    assert {"train_step", "eval_step", "checkpoint_state"} <= set(dir(Engine))


def test_hf_export_of_a_family_without_a_mapping_is_one_error():
    from megamoe.checkpoint.hf import family_for as hf_family_for

    with pytest.raises(ValueError, match=r"^model.family 'dit': no Hugging Face mapping "
                                         r"\(mapped: lm, vit, vlm\)"):
        hf_family_for(cfg_with("dit"))


def test_the_config_admits_exactly_the_registered_families():
    """The config layer cannot import the registry (it sits above it), so it keeps the names;
    they must agree, or a valid config would name a family without a record."""
    from megamoe.config.schema import MODEL_FAMILIES

    assert set(MODEL_FAMILIES) == set(families())


def test_the_check_entry_runs_the_family_checks_without_loading_megatron():
    import subprocess
    import sys

    code = ("import sys; from megamoe.models import checks; "
            "from megamoe.models.registry import family_for; "
            "from types import SimpleNamespace as N; "
            "fam = family_for(N(model=N(family='lm'))); "
            "print(checks.check_family in checks.CONFIG_CHECKS, len(fam.checks), "
            "len(fam.launch_checks), 'megatron' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    # lm: the data kind, MoR and modality-norm checks, the router-causality launch check
    assert out.stdout.split() == ["True", "3", "1", "False"], out
