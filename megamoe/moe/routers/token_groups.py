"""Token groups that span ranks: over which tokens a router selects (`selection_group`: the
process group holding the rest of each group's tokens, and how this rank's tokens split into
independent groups), the micro-batch's sequence shards (`SequenceShards`: gather detached
scores, sum partial losses), and the exact k-th largest value of detached scores held in pieces
by the ranks of a group, without gathering the scores (`kth_largest`).

Routers that choose tokens by rank order (expert-choice: each expert's top-c tokens; Expert
Race: the top-𝒦 of tokens × experts) need the threshold of the whole group's scores while each
rank holds only its share (a sequence shard under sequence parallelism, a DP rank's samples).
`kth_largest` finds it by radix selection on the float32 bit pattern: four rounds, each one
all-reduce of a [C, 256] histogram of the next byte among the candidates still tied with the
answer's prefix. The result is the exact value one process would get from `torch.topk` over the
concatenated scores, whatever the layout, for 4·256·C integers on the wire instead of the
scores themselves. Per-sequence selection uses the same machinery with one column per sample.

Order within a group. Megatron's tokens are position-major ([S, B] flattened: t = s·B + b),
the reference code's are batch-major (google-research/vmoe reshapes [batch, seq, D] into its
groups: sample by sample, position by position). A router whose result depends on the order of
the tokens within its group — V-MoE's buffer filling without priority, the stable tie-break
under priority — walks them in the reference's order, `batch_order`: per `sequence` that is the
positions (the two orders agree); per `micro-batch` sample b's positions, then sample b+1's, over
the whole (gathered) sequence. Thresholds (`kth_largest`) do not depend on the order.

Shapes: T tokens of this rank (S·B, Megatron order: token t is (s = t // B, b = t % B)),
N local items (tokens, or tokens × experts flattened), C independent columns (experts, or 1),
G independent groups' columns (C, or B·C per sequence).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

_RADIX_BITS = 8
_BINS = 1 << _RADIX_BITS
_SIGN = 1 << 31
_LOW32 = (1 << 32) - 1
RADIX_SHIFTS = tuple(range(32 - _RADIX_BITS, -1, -_RADIX_BITS))   # 24, 16, 8, 0

# Over which tokens a router may select, from the narrowest: each token alone; each sequence
# (sample); the micro-batch; micro-batch m of every data-parallel rank together.
SELECTION_GROUPS = ("token", "sequence", "micro-batch", "data-parallel")


@dataclass(frozen=True)
class SelectionGroup:
    """This rank's view of a router's selection groups of one `kind`: `group` is the process
    group whose ranks hold the rest of each group's tokens (None: all of it is here)."""
    kind: str
    group: object = None

    @property
    def ranks(self) -> int:
        return group_size(self.group)

    def num_tokens(self, num_local_tokens: int, batch: int) -> int:
        """Tokens of one selection group, given this rank's T = S·B."""
        assert num_local_tokens % batch == 0, (num_local_tokens, batch)
        if self.kind == "token":
            return 1
        if self.kind == "sequence":
            return num_local_tokens // batch * self.ranks
        return num_local_tokens * self.ranks

    def columns(self, values_TC: torch.Tensor, batch: int) -> torch.Tensor:
        """[N, G]: one column per independent group and column of `values_TC`; per sequence,
        the rows of sample b are those with t % B = b, so [S·B, C] → [S, B·C]."""
        if self.kind == "sequence":
            return values_TC.reshape(-1, batch * values_TC.shape[1])
        assert self.kind != "token", "a token-local router has no group threshold"
        return values_TC

    def kth_largest(self, values_TC: torch.Tensor, k: int, batch: int) -> torch.Tensor:
        """The k-th largest of each column of `values_TC` within each selection group, over
        every rank of the group, broadcastable to `values_TC` ([T, C] per sequence, else
        [1, C])."""
        T, C = values_TC.shape
        threshold_G = kth_largest(self.columns(values_TC, batch), k, self.group)
        if self.kind == "sequence":
            return threshold_G.view(1, batch, C).expand(T // batch, batch, C).reshape(T, C)
        return threshold_G.view(1, C)


def batch_order(num_tokens: int, batch: int, device=None) -> torch.Tensor:
    """[N] long: the Megatron-order indices (t = s·B + b) of a group's N = S·B tokens listed in
    batch order (sample 0's positions 0 … S−1, then sample 1's, …), the reference's order."""
    assert num_tokens % batch == 0, (num_tokens, batch)
    return torch.arange(num_tokens, device=device).view(num_tokens // batch, batch).t().reshape(-1)


def selection_group(kind: str, pg_collection, sequence_parallel: bool) -> SelectionGroup:
    """Where the selection groups of `kind` live for this rank (one rank: no group).

    sequence and micro-batch: under sequence parallelism the TP (and CP) ranks hold the
    micro-batch's sequence shards, hence every sample's; without it every TP rank holds the
    whole micro-batch and only CP splits it. data-parallel: the DP (and CP) ranks'
    micro-batches too, and under sequence parallelism their TP shards. token: no group."""
    assert kind in SELECTION_GROUPS, kind
    if pg_collection is None or kind == "token":
        return SelectionGroup(kind)
    if kind == "data-parallel":
        group = pg_collection.tp_dp_cp if sequence_parallel else pg_collection.dp_cp
    else:
        group = pg_collection.tp_cp if sequence_parallel else pg_collection.cp
    spans = group is not None and dist.is_initialized() and group.size() > 1
    return SelectionGroup(kind, group if spans else None)


def group_size(group) -> int:
    return 1 if group is None else group.size()


def all_reduce_sum(tensor: torch.Tensor, group) -> torch.Tensor:
    """In-place sum over `group` (nothing for one rank); returns the tensor."""
    if group is not None:
        dist.all_reduce(tensor, group=group)
    return tensor


class SequenceShards:
    """Where this rank's tokens sit in the micro-batch, whose sequence shards the ranks of
    `group` hold (`selection_group("micro-batch", ...).group`; None: all here).

    A router whose selection group is the micro-batch (capacity, batch priority) `gather`s the
    *detached* scores, decides on the whole micro-batch and keeps its own rows (`local`). A loss
    that is a function of micro-batch sums (importance, load, entropies) all-reduces the partial
    sums with `sum_over_ranks`: the value is the micro-batch's, the gradient reaches this rank's
    tokens only, so every rank's backward yields exactly its share of the reference's gradient.
    """

    def __init__(self, group=None):
        self.group = group
        self.size = group_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)

    def gather(self, x_T: torch.Tensor) -> torch.Tensor:
        """[N, ...] detached: every rank's rows, in sequence order."""
        x_T = x_T.detach()
        if self.group is None:
            return x_T
        parts = [torch.empty_like(x_T) for _ in range(self.size)]
        dist.all_gather(parts, x_T.contiguous(), group=self.group)
        return torch.cat(parts, dim=0)

    def local(self, x_N: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a micro-batch-wide tensor."""
        T = x_N.shape[0] // self.size
        return x_N[self.rank * T:(self.rank + 1) * T]

    def sum_over_ranks(self, partial: torch.Tensor) -> torch.Tensor:
        """Σ over the TP ranks of `partial`; gradients flow to the local term only."""
        if self.group is None:
            return partial
        total = partial.detach().clone()
        dist.all_reduce(total, group=self.group)
        return partial + (total - partial.detach())


def ordered_keys(values: torch.Tensor) -> torch.Tensor:
    """float32 → int64 keys in [0, 2³²) with the same order (IEEE-754 sign-magnitude → offset)."""
    bits = values.float().contiguous().view(torch.int32).to(torch.int64) & _LOW32
    negative = (bits & _SIGN) != 0
    return torch.where(negative, bits ^ _LOW32, bits | _SIGN)


def values_from_keys(keys: torch.Tensor) -> torch.Tensor:
    bits = torch.where((keys & _SIGN) != 0, keys ^ _SIGN, keys ^ _LOW32)
    bits = torch.where(bits >= _SIGN, bits - (1 << 32), bits)
    return bits.to(torch.int32).view(torch.float32)


def byte_histogram(keys_NC: torch.Tensor, prefix_C: torch.Tensor, shift: int) -> torch.Tensor:
    """[C, 256] counts of the byte at `shift` among the items whose higher bytes equal the
    prefix found so far (all items in the first round)."""
    C = keys_NC.shape[1]
    candidate_NC = (keys_NC >> (shift + _RADIX_BITS)) == prefix_C
    byte_NC = (keys_NC >> shift) & (_BINS - 1)
    column_base_1C = torch.arange(C, device=keys_NC.device).unsqueeze(0) * _BINS
    return torch.bincount((column_base_1C + byte_NC)[candidate_NC],
                          minlength=C * _BINS).view(C, _BINS)


def descend(hist_CB: torch.Tensor, prefix_C: torch.Tensor, remaining_C: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The byte that holds the remaining-th largest candidate: (prefix extended by it, rank of
    the answer among the candidates that share it)."""
    at_or_above_CB = hist_CB.flip(-1).cumsum(-1)          # [:, j]: candidates with byte ≥ 255-j
    j_C = (at_or_above_CB < remaining_C.unsqueeze(1)).sum(-1)
    above_C = at_or_above_CB.gather(1, (j_C - 1).clamp_min(0).unsqueeze(1)).squeeze(1)
    remaining_C = remaining_C - torch.where(j_C > 0, above_C, torch.zeros_like(above_C))
    return prefix_C * _BINS + (_BINS - 1 - j_C), remaining_C


@torch.no_grad()
def kth_largest(values_NC: torch.Tensor, k_C: torch.Tensor | int, group=None) -> torch.Tensor:
    """[C] float32: for each column, the k-th largest of that column's values over every rank of
    `group`; 1 ≤ k ≤ the group's item count per column (the callers guarantee it; checking it
    here would synchronise the device). NaN orders above +inf."""
    assert values_NC.dim() == 2, values_NC.shape
    keys_NC = ordered_keys(values_NC)
    C = values_NC.shape[1]
    remaining_C = torch.as_tensor(k_C, dtype=torch.int64, device=keys_NC.device).expand(C).clone()
    prefix_C = torch.zeros(C, dtype=torch.int64, device=keys_NC.device)
    for shift in RADIX_SHIFTS:
        hist_CB = all_reduce_sum(byte_histogram(keys_NC, prefix_C, shift), group)
        prefix_C, remaining_C = descend(hist_CB, prefix_C, remaining_C)
    return values_from_keys(prefix_C)
