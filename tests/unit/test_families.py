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
    with pytest.raises(ValueError, match=r"^model.family: unknown family 'vit' \(known: lm\)$"):
        family_for(cfg_with("vit"))


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
                                         r"\(mapped: lm\)"):
        hf_family_for(cfg_with("dit"))
