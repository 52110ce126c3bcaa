"""FP8 recipes: which format and which scale granularity each operand of each GEMM gets.

A linear `y_TN = x_TK · w_NKᵀ` has three GEMMs, each `a · bᵀ` contracting the last dimension:
  fprop  a = x_TK,   b = w_NK     (contract K, the hidden size)
  dgrad  a = g_TN,   b = wᵀ_KN    (contract N)
  wgrad  a = gᵀ_NT,  b = xᵀ_KT    (contract T: activations are quantised along the tokens)
Forward tensors (x, w) are E4M3; the gradient g is E5M2 (Transformer Engine's HYBRID) for the
tensor-scaled recipes and E4M3 for rowwise and blockwise (DeepSeek-V3 uses E4M3 throughout);
`grad_format` overrides it.

  tensorwise  one scale per expert and tensor from the current amax (current scaling)
  delayed     one scale per expert and tensor from the max of an amax history (TE's delayed
              scaling): the tensor is cast with a scale computed before it is seen
  rowwise     one scale per row of each operand (per token, per output channel)
  blockwise   1×128 tiles for activations and gradients, 128×128 blocks for weights
"""

from __future__ import annotations

from dataclasses import dataclass

from megamoe.fp8.formats import E4M3, E5M2, FORMATS, Format

RECIPES = ("tensorwise", "delayed", "rowwise", "blockwise")

# (a kind, b kind) per GEMM
_KINDS = {
    "tensorwise": {"fprop": ("tensor", "tensor"), "dgrad": ("tensor", "tensor"),
                   "wgrad": ("tensor", "tensor")},
    "rowwise": {"fprop": ("rows", "rows"), "dgrad": ("rows", "rows"), "wgrad": ("rows", "rows")},
    "blockwise": {"fprop": ("tiles", "blocks"), "dgrad": ("tiles", "blocks"),
                  "wgrad": ("tiles", "tiles")},
}
_KINDS["delayed"] = _KINDS["tensorwise"]


@dataclass(frozen=True)
class Recipe:
    name: str
    grad: Format = E5M2
    fwd: Format = E4M3
    history_len: int = 1      # amax history per expert and tensor (delayed: the scale's window)
    margin: int = 0           # scale = amax / fmax · 2^margin

    def __post_init__(self):
        assert self.name in RECIPES, self.name

    @property
    def delayed(self) -> bool:
        return self.name == "delayed"

    @property
    def tensor_scaled(self) -> bool:
        return self.name in ("tensorwise", "delayed")

    def kinds(self, gemm: str) -> tuple[str, str]:
        return _KINDS[self.name][gemm]


def make_recipe(name: str, grad_format: str = "auto", history_len: int = 16,
                margin: int = 0) -> Recipe:
    """The recipe of `model.moe.fp8` (`recipe`, `grad_format`, `amax_history_len`, `margin`)."""
    if grad_format == "auto":
        grad = E5M2 if name in ("tensorwise", "delayed") else E4M3
    else:
        grad = FORMATS[grad_format]
    return Recipe(name, grad=grad, history_len=history_len if name == "delayed" else 1,
                  margin=margin)
