"""Per-recursion LoRA on the shared layers of the recursion block (Relaxed Recursive
Transformers, Bae et al., arXiv 2410.20672; papers.md §2).

RRT gives every tied weight matrix at unrolled position ℓ its own low-rank update,
W x → W x + (α/r)·B^ℓ A^ℓ x. In megamoe a shared `TransformerLayer` runs once per recursion
step, so the unrolled position is (recursion step r, layer j within the step): one adapter per
(r, j) and target linear. The block selects the adapters of (r, j) before it calls the layer
(`RecursionLoRA.select`); a forward hook on each targeted Megatron linear adds the selected
adapter's output to the linear's output (the linear and its checkpoint keys stay unchanged).

A ~ N(0, 1/d_in) (Kaiming-normal with gain 1, d_in the global input width), B = 0, so the
relaxed model starts as the unrelaxed one; the global initialisation is `models.init`'s (by
checkpoint key, identical for every layout).

Tensor + sequence parallelism (shapes: S sequence, B batch, D in, O out, R rank, T = TP size;
"partial" = a summand of a TP all-reduce):
- column-parallel base (`qkv`, `fc1`; W sharded on O, input x an SP shard [S/T, B, D]):
  A [R, D] replicated, u = A x on this rank's sequence shard, all-gathered over the sequence
  (backward: reduce-scatter, summing the O-shards' contributions), then B [O/T, R] sharded like
  W. A's gradient comes from this rank's tokens only: marked `sequence_parallel`, so Megatron's
  `finalize_model_grads` all-reduces it over TP like a norm weight under SP.
  Without SP (x replicated): u is copied into the TP region (backward: all-reduce), A needs no
  reduction.
- row-parallel base (`proj`, `fc2`; W sharded on D, input x [S, B, D/T]): A [R, D/T] sharded
  like W, u = A x is partial; reduce-scattered to this rank's sequence shard [S/T, B, R] with SP
  (backward: all-gather), all-reduced without; then B [O, R] replicated. Under SP B's gradient
  covers this rank's tokens only: marked `sequence_parallel`.
Only rank-R activations cross TP ranks, never [S, B, D].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.mlp import MLP, apply_swiglu_sharded_factory
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)

# target name → (path of the linear in a TransformerLayer)
TARGETS = {"qkv": ("self_attention", "linear_qkv"), "proj": ("self_attention", "linear_proj"),
           "fc1": ("mlp", "linear_fc1"), "fc2": ("mlp", "linear_fc2")}


def target_linear(layer: nn.Module, target: str) -> nn.Module:
    parent, name = TARGETS[target]
    module = getattr(layer, parent)
    if parent == "mlp" and not isinstance(module, MLP):
        raise ValueError(f"model.mor.lora_targets: {target!r} needs a dense FFN, layer "
                         f"{layer.layer_number} has {type(module).__name__}")
    return getattr(module, name)


class LoRAAdapter(nn.Module):
    """ΔW x = (α/R)·B A x for one Megatron linear at one unrolled position (module docstring
    for the TP/SP layout). `forward` takes the linear's input and returns the term to add to its
    output."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, *,
                 glu: bool = False):
        super().__init__()
        if isinstance(base, ColumnParallelLinear):
            assert not base.gather_output, "LoRA on a column-parallel linear with gathered output"
            self.column, d_in, d_in_local = True, base.input_size, base.input_size
            d_out_local = base.output_size_per_partition
        elif isinstance(base, RowParallelLinear):
            assert base.input_is_parallel, "LoRA on a row-parallel linear with a full input"
            self.column, d_in, d_in_local = False, base.input_size, base.input_size_per_partition
            d_out_local = base.output_size
        else:
            raise TypeError(f"LoRA needs a Megatron Column/RowParallelLinear, got {type(base)}")
        dtype = base.weight.dtype
        self.tp_group, self.sequence_parallel = base.tp_group, bool(base.sequence_parallel)
        self.scale, self.dropout = alpha / rank, nn.Dropout(dropout) if dropout else None
        self.A = nn.Parameter(torch.randn(rank, d_in_local, dtype=dtype) / math.sqrt(d_in))
        self.B = nn.Parameter(torch.zeros(d_out_local, rank, dtype=dtype))
        sharded, replicated = (self.B, self.A) if self.column else (self.A, self.B)
        set_tensor_model_parallel_attributes(sharded, True, 0 if self.column else 1, 1)
        if self.sequence_parallel:       # gradient from this rank's tokens: summed over TP
            replicated.sequence_parallel = True
        self.glu = glu                   # output = [gate; up] halves, each sharded over TP

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            x = self.dropout(x)
        u_sbR = F.linear(x, self.A)      # column: this rank's tokens; row: partial over TP
        group, tp = self.tp_group, self.tp_group.size()
        if self.column and self.sequence_parallel:
            u_sbR = gather_from_sequence_parallel_region(u_sbR, group=group)
        elif self.column and tp > 1:
            u_sbR = copy_to_tensor_model_parallel_region(u_sbR, group=group)
        elif self.sequence_parallel:
            u_sbR = reduce_scatter_to_sequence_parallel_region(u_sbR, group=group)
        elif tp > 1:
            u_sbR = reduce_from_tensor_model_parallel_region(u_sbR, group=group)
        return F.linear(u_sbR, self.B) * self.scale

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        """A and B under layout-independent keys; the sharded factor split like the base
        weight (fc1 under SwiGLU: gate and up halves, as Megatron's MLP does)."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        axis = {"B": 0} if self.column else {"A": 1}
        out = make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, axis, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
        if self.glu:
            out[f"{prefix}B"] = apply_swiglu_sharded_factory(
                out[f"{prefix}B"], sharded_offsets, metadata.get("singleton_local_shards", False))
        return out


def _adapter(layer, target: str, rank: int, alpha: float, dropout: float) -> LoRAAdapter:
    glu = target == "fc1" and layer.config.gated_linear_unit
    return LoRAAdapter(target_linear(layer, target), rank, alpha, dropout, glu=glu)


class _Slot:
    """What a hooked linear adds on its next call: nothing (None), one adapter, or per batch
    row (dim 1 of [S, B, ·]) a list of (adapter, row indices) — cached generation batches
    tokens of different recursion steps through one shared layer."""

    def __init__(self):
        self.adapter: LoRAAdapter | list | None = None

    def __call__(self, module, args, kwargs, output):
        if self.adapter is None:
            return None
        x = args[0] if args else kwargs["input_"]
        out, bias = output
        if isinstance(self.adapter, LoRAAdapter):
            return out + self.adapter(x).to(out.dtype), bias
        delta = torch.zeros_like(out)
        for adapter, rows in self.adapter:
            delta = delta.index_copy(1, rows, adapter(x.index_select(1, rows)).to(out.dtype))
        return out + delta, bias


class RecursionLoRA(nn.ModuleList):
    """`self[r][j][target]`: the adapter of shared layer j of recursion step r (state-dict keys
    `lora.{r}.{j}.{target}.{A,B}`, also the checkpoint keys)."""

    def __init__(self, layers: nn.ModuleList, steps, targets, rank: int, alpha: float,
                 dropout: float = 0.0):
        super().__init__(
            nn.ModuleList(nn.ModuleDict({t: _adapter(layers[idx], t, rank, alpha, dropout)
                                         for t in targets})
                          for idx in step)
            for step in steps)
        self.steps, self.targets = [tuple(s) for s in steps], list(targets)
        self._slots: dict = {}      # (pool index, target) → _Slot; plain dict: no submodules
        self._hooks = []
        for idx in sorted({i for s in self.steps for i in s}):
            for t in self.targets:
                slot = self._slots[(idx, t)] = _Slot()
                self._hooks.append(target_linear(layers[idx], t).register_forward_hook(
                    slot, with_kwargs=True))

    def select(self, r: int | None, j: int = 0) -> None:
        """Make the pool layer of (r, j) add its adapters; `None`: every linear plain."""
        for slot in self._slots.values():
            slot.adapter = None
        if r is not None:
            for t in self.targets:
                self._slots[(self.steps[r][j], t)].adapter = self[r][j][t]

    def select_rows(self, r_B, j: int) -> None:
        """Batch row b uses the adapters of (r_B[b], j); every r_B[b]'s step must apply the
        same pool layer at j (tokens a generator batches together). Not under TP (the rows of
        an SP shard are not the batch)."""
        self.select(None)
        layers = {self.steps[r][j] for r in r_B}
        assert len(layers) == 1, f"rows of one call run pool layers {layers}"
        idx = layers.pop()
        rows: dict = {}
        for b, r in enumerate(r_B):
            rows.setdefault(r, []).append(b)
        for t in self.targets:
            self._slots[(idx, t)].adapter = [(self[r][j][t], torch.tensor(bs))
                                             for r, bs in rows.items()]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        out = {}
        for r, step in enumerate(self):
            for j, adapters in enumerate(step):
                for t, adapter in adapters.items():
                    out.update(adapter.sharded_state_dict(f"{prefix}{r}.{j}.{t}.",
                                                          sharded_offsets, metadata))
        return out


def attach_lora(block, mor) -> None:
    """Give `block` (a RecursionBlock) the `model.mor` section's adapters, if lora_rank > 0."""
    if not mor.lora_rank:
        return
    block.lora = RecursionLoRA(block.layers, block.steps, mor.lora_targets, mor.lora_rank,
                               mor.resolved_lora_alpha(), mor.lora_dropout)
