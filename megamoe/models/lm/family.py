"""The `lm` family: Megatron's GPTModel with megamoe's MoE decoder spec, or with a
Mixture-of-Recursions decoder (an option of this family, `model.mor`), trained on token windows.

What MoR adds to a run reaches the loop through the family's generic paths: its depth
statistics and measured FLOPs through `step_metrics`, its loss-free bias update through
`after_step_hooks`, its FLOPs per recursion step through `describe`.
"""

from __future__ import annotations

from megamoe.models.registry import Family, register

# Imports happen inside the functions: the registry (and with it the one check entry) is read
# before a run starts, where loading Megatron would cost seconds per check.


def _task(cfg):
    from megamoe.models.lm.task import LMTask

    return LMTask(cfg)


def _parameter_counts(cfg, vocab_size: int):
    from megamoe.models.accounting import parameter_counts

    return parameter_counts(cfg, vocab_size)


def _flops_per_token(cfg, vocab_size: int) -> float:
    from megamoe.models.accounting import flops_per_token

    return flops_per_token(cfg, vocab_size)


def _transformer_config(cfg, dims, *, sequence_parallel: bool, dtype):
    from megamoe.models.lm.model import transformer_config

    return transformer_config(cfg, dims, sequence_parallel=sequence_parallel, dtype=dtype)


def _build(cfg, tconfig, grid, vocab_size: int, grids=None) -> list:
    from megamoe.models.lm.model import build_lm

    return build_lm(cfg, tconfig, grid, vocab_size)


def _check_mor(cfg) -> None:
    from megamoe.mor.checks import check_mor

    check_mor(cfg)


def _check_data(cfg) -> None:
    """The language model reads token windows, not images."""
    if cfg.data.kind in ("shapes", "scenes", "sounds"):
        from megamoe.config.errors import fail

        other = "vit" if cfg.data.kind == "shapes" else "vlm"
        fail("data.kind", f"'{cfg.data.kind}' is an image or audio set; model.family 'lm' "
             f"trains on tokens (markov or indexed), or set model.family: {other}")


def _check_modality_norm(cfg) -> None:
    """The synthetic modality ids (token id mod data.synthetic_modalities) fit the norm's M."""
    m, given = cfg.model, cfg.data.synthetic_modalities
    if m.modality_norm != "none" and given > m.num_modalities:
        from megamoe.config.errors import fail

        fail("model.num_modalities", f"{m.num_modalities} is fewer than "
             f"data.synthetic_modalities ({given}) that model.modality_norm reads")


def _check_router_causality(cfg) -> None:
    """megamoe.moe.routers' check (imports Megatron: a launch check, run last)."""
    from megamoe.moe.routers import check_router_causality

    check_router_causality(cfg)


def _after_step_hooks(chunks, grid) -> list:
    """The routers' end-of-step updates (V-MoE's noise step, loss-free biases) and MoR's
    token-choice loss-free bias (its assignment ratios averaged over data-parallel ranks)."""
    from megamoe.models.lm.model import moe_layers

    routers = [layer.router for layer in moe_layers(chunks)]
    hooks = [r.after_step for r in routers]
    if any(True for _ in _mor_decoders(chunks)):
        from megamoe.mor.decoder import mor_after_step

        hooks.append(lambda: mor_after_step(chunks, grid.dp))
    return hooks


def _mor_decoders(chunks):
    from megamoe.mor.decoder import mor_decoders

    return mor_decoders(chunks)


class MoRStepMetrics:
    """Depth statistics of the recursion blocks and the training FLOPs per token measured from
    them (megamoe.mor.metrics, megamoe.mor.accounting), read after each step."""

    def __init__(self, cfg, chunks, vocab_size: int):
        from megamoe.mor.metrics import MoRDepthStats

        self.cfg, self.vocab = cfg, vocab_size
        self.depth = MoRDepthStats(chunks, cfg.model.mor.num_recursions)

    def read(self, units_per_step: int) -> dict:
        out = self.depth.read(units_per_step)
        out.update(_mor_measured_flops(self.cfg, self.vocab, out))
        return out

    def flops_per_unit(self, metrics: dict) -> float | None:
        return metrics.get("mor/flops_per_token")


def _step_metrics(cfg, chunks, grid, vocab_size: int):
    return MoRStepMetrics(cfg, chunks, vocab_size) if cfg.model.mor.enabled else None


def _mor_measured_flops(cfg, vocab: int, mor_metrics: dict) -> dict:
    """Training FLOPs per token of this step from the measured share of tokens that ran each
    recursion step (`mor/kept_step_r`): in total and per step r (the FLOP model of
    megamoe.mor.accounting with the measured k_r instead of the nominal ones)."""
    from megamoe.mor.accounting import mor_flops_by_step

    R = cfg.model.mor.num_recursions
    kept = [mor_metrics.get(f"mor/kept_step_{r}") for r in range(1, R + 1)]
    if any(k is None for k in kept):
        return {}
    parts = mor_flops_by_step(cfg, vocab, fractions=kept)
    out = {"mor/flops_per_token": sum(parts.values())}
    out.update({f"mor/flops_per_token_step_{r}": parts[f"step {r}"] for r in range(1, R + 1)})
    return out


def _describe(cfg, vocab: int) -> dict:
    if not cfg.model.mor.enabled:
        return {}
    return {"MoR FLOPs/token by recursion step": _mor_flops_line(cfg, vocab)}


def _mor_flops_line(cfg, vocab: int) -> str:
    """Training FLOPs per token outside the recursion block and in each step r (k_r tokens of
    the sequence run it), e.g. "outside 8.4e+05, step 1 (k=64) 7.9e+05, …; total 2.4e+06"."""
    from megamoe.mor.accounting import mor_flops_by_step, step_kept

    parts, kept = mor_flops_by_step(cfg, vocab), step_kept(cfg)
    text = [f"outside {parts['outside']:.3g}"]
    text += [f"step {r} (k={k:.4g}) {parts[f'step {r}']:.3g}"
             for r, k in enumerate(kept, start=1)]
    return ", ".join(text) + f"; total {sum(parts.values()):.3g}"


LM = register(Family(
    name="lm",
    transformer_config=_transformer_config,
    build=_build,
    task=_task,
    parameter_counts=_parameter_counts,
    flops_per_unit=_flops_per_token,
    checks=(_check_data, _check_mor, _check_modality_norm),
    launch_checks=(_check_router_causality,),
    causal=True,
    unit="token",
    step_metrics=_step_metrics,
    after_step_hooks=_after_step_hooks,
    describe=_describe,
    notes="causal MoE language model (GPTModel; Mixture-of-Recursions with model.mor)",
))
