"""Parameter sharing of recursive transformers: which shared-pool layer each unrolled layer uses.

Mixture-of-Recursions (Bae et al., arXiv 2507.10524, §2.1 and Table 6; papers.md §1.2). L unrolled
layers, N_r recursions, pool Φ'. With base depth K (the layers of one recursion step):

- Cycle           ℓ ↦ ℓ mod K,       K = L / N_r    (L=9, N_r=3: 012 012 012)
- Sequence        ℓ ↦ ⌊ℓ / N_r⌋,     K = L / N_r    (L=9, N_r=3: 000 111 222)
- Middle-Cycle    0 ↦ 0, L−1 ↦ K+1, else 1 + (ℓ−1) mod K, K = (L−2)/N_r  (the default)
- Middle-Sequence 0 ↦ 0, L−1 ↦ K+1, else 1 + ⌊(ℓ−1)/N_r⌋

Middle-* keep the first and last layers unique (pool slots 0 and K+1). The official code drops
layers (np.linspace) when L (or L−2) is not a multiple of N_r; the paper adds layers instead
(1 + 8·4 + 1 = 34). megamoe refuses such an L so that the model has exactly the layers asked for.

A recursion step r (0-based) is the slice of unrolled layers [r·K, (r+1)·K) after the unique
first layer: `recursion_steps` returns the pool indices it applies, the input of the MoR block.
"""

from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("cycle", "sequence", "middle_cycle", "middle_sequence")
DEFAULT_STRATEGY = "middle_cycle"


@dataclass(frozen=True)
class SharingPlan:
    """The unrolled → pool map of one model, and the MoR view of it."""
    strategy: str
    num_layers: int             # L, unrolled
    num_recursions: int         # N_r
    base_depth: int             # K, layers per recursion step
    pool_index: tuple           # [L] unrolled layer -> pool slot
    first_unique: int | None    # pool slot of the unique first layer (Middle-*), else None
    last_unique: int | None     # pool slot of the unique last layer (Middle-*), else None

    @property
    def pool_size(self) -> int:
        return max(self.pool_index) + 1

    def recursion_steps(self) -> list[tuple]:
        """Pool slots applied at each recursion step r = 0..N_r−1 (K each)."""
        start = 1 if self.first_unique is not None else 0
        K = self.base_depth
        return [tuple(self.pool_index[start + r * K:start + (r + 1) * K])
                for r in range(self.num_recursions)]


def base_depth(strategy: str, num_layers: int, num_recursions: int) -> int:
    """K: layers per recursion step; ValueError naming the fields when L does not split."""
    if strategy not in STRATEGIES:
        raise ValueError(f"model.mor.sharing={strategy!r}: expected one of {STRATEGIES}")
    if num_recursions < 1:
        raise ValueError(f"model.mor.num_recursions={num_recursions}: must be ≥ 1")
    middle = strategy.startswith("middle")
    shared = num_layers - 2 if middle else num_layers
    if shared < num_recursions or shared % num_recursions:
        need = "L − 2" if middle else "L"
        suggestion = num_recursions * max(1, shared // num_recursions) + (2 if middle else 0)
        raise ValueError(
            f"model.num_layers={num_layers} with model.mor.num_recursions={num_recursions} and "
            f"model.mor.sharing={strategy}: {need} = {shared} must be a positive multiple of "
            f"N_r (e.g. num_layers={suggestion})")
    return shared // num_recursions


def pool_index(strategy: str, layer: int, num_layers: int, num_recursions: int) -> int:
    """Pool slot of unrolled layer ℓ (0-based), papers.md §1.2."""
    K = base_depth(strategy, num_layers, num_recursions)
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} outside 0..{num_layers - 1}")
    if strategy == "cycle":
        return layer % K
    if strategy == "sequence":
        return layer // num_recursions
    if layer == 0:
        return 0
    if layer == num_layers - 1:
        return K + 1
    if strategy == "middle_cycle":
        return 1 + (layer - 1) % K
    return 1 + (layer - 1) // num_recursions          # middle_sequence


def sharing_plan(strategy: str, num_layers: int, num_recursions: int) -> SharingPlan:
    K = base_depth(strategy, num_layers, num_recursions)
    index = tuple(pool_index(strategy, ell, num_layers, num_recursions)
                  for ell in range(num_layers))
    middle = strategy.startswith("middle")
    return SharingPlan(strategy=strategy, num_layers=num_layers, num_recursions=num_recursions,
                       base_depth=K, pool_index=index,
                       first_unique=0 if middle else None,
                       last_unique=K + 1 if middle else None)
