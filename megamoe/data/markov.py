"""Built-in corpus: an order-1 Markov chain over `vocab_size` tokens with a known entropy rate.

Each state s has `branching` successors: (s + 1) mod V, which makes the chain irreducible, plus
`branching − 1` others drawn at random; their probabilities are Dirichlet(α) draws mixed with 1 %
of the uniform distribution (so none is vanishingly small). With α = 0.7 and branching 4 the
entropy rate is 0.83–1.05 nats across seeds (0.83 for the default seed 7), clearly below
log 4 ≈ 1.39 nats.

Every sample starts in a state drawn from the stationary distribution π (πP = π), so the token
process is stationary and the best possible next-token cross-entropy, at every position, is the
entropy rate H = Σ_s π_s H(P_s·) (nats). A model whose loss goes below H is reading the future.

Sample i of a split is a function of (seed, split, i) only: its uniforms come from a counter-based
hash (SplitMix64) of those numbers, so the data order depends on the sample index alone and any
sample can be made without making the others.
"""

from __future__ import annotations

from bisect import bisect_right

import numpy as np

SPLITS = {"train": 0, "valid": 1}
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _splitmix(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _cdf(p: np.ndarray) -> np.ndarray:
    """Row-wise cumulative probabilities, clamped so the last reachable entry is exactly 1.0.

    Token = number of cdf entries ≤ u (u ∈ [0, 1)) — what `bisect_right` returns — never lands
    on a zero-probability entry.
    """
    cdf = np.minimum(np.cumsum(p, axis=-1), 1.0)
    last = p.shape[-1] - 1 - np.argmax((p > 0)[..., ::-1], axis=-1)   # last nonzero per row
    cdf[np.arange(p.shape[-1]) >= last[..., None]] = 1.0
    return cdf


class MarkovCorpus:
    """Samples of `seq_length + 1` tokens (int64) from a stationary order-1 Markov chain."""

    def __init__(self, vocab_size: int = 64, branching: int = 4, seed: int = 7,
                 seq_length: int = 64, num_samples: int = 1_000_000, split: str = "train",
                 concentration: float = 0.7, *, _successors=None, _probs=None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if not 1 <= branching <= vocab_size:
            raise ValueError(f"branching must be in [1, vocab_size={vocab_size}], got {branching}")
        if seq_length < 1 or num_samples < 1:
            raise ValueError(f"seq_length and num_samples must be ≥ 1, got {seq_length}, "
                             f"{num_samples}")
        self.vocab_size, self.seq_length, self.num_samples = vocab_size, seq_length, num_samples
        self.seed, self.split = seed, split
        if _successors is None:
            _successors, _probs = self._random_chain(vocab_size, branching, seed, concentration)
        self.successors, self.probs = _successors, _probs        # [V, K] each
        self.pi = self._stationary(self.successors, self.probs)
        self._cdf_VK = _cdf(self.probs)
        self._pi_cdf = _cdf(self.pi)
        self._cdf_rows = [row.tolist() for row in self._cdf_VK]   # for the per-sample walk
        self._succ_rows = [row.tolist() for row in self.successors]
        self._pi_cdf_list = self._pi_cdf.tolist()
        key = np.random.SeedSequence([seed, SPLITS[split]]).generate_state(2, np.uint64)
        self._key0, self._key1 = key[0], key[1]

    @classmethod
    def from_matrix(cls, transition, seq_length: int = 64, num_samples: int = 1000,
                    seed: int = 0, split: str = "train") -> "MarkovCorpus":
        """A corpus from an explicit row-stochastic matrix (must be irreducible)."""
        P = np.asarray(transition, dtype=np.float64)
        if P.ndim != 2 or P.shape[0] != P.shape[1]:
            raise ValueError(f"transition must be a square matrix, got shape {P.shape}")
        if (P < 0).any() or not np.allclose(P.sum(1), 1.0, atol=1e-9):
            raise ValueError("transition rows must be non-negative and sum to 1")
        if not _irreducible(P > 0):
            raise ValueError("transition matrix is not irreducible: its stationary "
                             "distribution is not unique")
        V, K = P.shape[0], int((P > 0).sum(1).max())
        order = np.argsort(P <= 0, axis=1, kind="stable")[:, :K]      # nonzeros first, in order
        probs = np.take_along_axis(P, order, axis=1)
        return cls(vocab_size=V, branching=K, seed=seed, seq_length=seq_length,
                   num_samples=num_samples, split=split, _successors=order, _probs=probs)

    @staticmethod
    def _random_chain(V: int, branching: int, seed: int, concentration: float):
        rng = np.random.default_rng(seed)
        succ = np.empty((V, branching), dtype=np.int64)
        succ[:, 0] = (np.arange(V) + 1) % V
        for s in range(V):        # others: distinct offsets from s+1, so never s+1 again
            succ[s, 1:] = (succ[s, 0] + 1 + rng.choice(V - 1, branching - 1, replace=False)) % V
        probs = rng.dirichlet(np.full(branching, concentration), size=V)
        probs = 0.99 * probs + 0.01 / branching
        return succ, probs / probs.sum(1, keepdims=True)

    @staticmethod
    def _stationary(succ: np.ndarray, probs: np.ndarray, tol: float = 1e-15) -> np.ndarray:
        """π of the chain by power iteration on the lazy chain (P + I)/2 (same π, aperiodic)."""
        V = succ.shape[0]
        pi = np.full(V, 1.0 / V)
        for _ in range(200_000):
            step = np.bincount(succ.ravel(), weights=(pi[:, None] * probs).ravel(), minlength=V)
            nxt = 0.5 * (pi + step)
            nxt /= nxt.sum()
            if np.abs(nxt - pi).sum() < tol:
                return nxt
            pi = nxt
        raise ValueError("Markov chain mixes too slowly to find its stationary distribution")

    @property
    def entropy_rate(self) -> float:
        """H = Σ_s π_s H(P_s·) in nats: the optimal next-token cross-entropy at every position."""
        p = self.probs
        h_V = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(1)
        return float(self.pi @ h_V)

    def transition_matrix(self) -> np.ndarray:
        """Dense [V, V] transition matrix P."""
        P = np.zeros((self.vocab_size, self.vocab_size))
        np.add.at(P, (np.arange(self.vocab_size)[:, None], self.successors), self.probs)
        return P

    def _uniforms(self, indices: np.ndarray) -> np.ndarray:
        """[n, S+1] uniforms in [0, 1), a hash of (seed, split, sample index, position)."""
        idx = np.asarray(indices, dtype=np.uint64)
        base = _splitmix(self._key0 + idx * _GOLDEN) ^ self._key1                   # [n]
        t = np.arange(1, self.seq_length + 2, dtype=np.uint64) * _GOLDEN           # [S+1]
        z = _splitmix(base[:, None] + t[None, :])
        return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53

    def _check(self, indices: np.ndarray) -> None:
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_samples):
            raise IndexError(f"sample index out of range [0, {self.num_samples})")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        self._check(np.asarray([i]))
        u = self._uniforms(np.asarray([i]))[0].tolist()
        state = bisect_right(self._pi_cdf_list, u[0])
        out = [state]
        cdf, succ = self._cdf_rows, self._succ_rows
        for x in u[1:]:
            state = succ[state][bisect_right(cdf[state], x)]
            out.append(state)
        return np.asarray(out, dtype=np.int64)

    def get_batch(self, indices) -> np.ndarray:
        """[n, S+1] int64: samples `indices`, vectorised over samples; equals stacking `self[i]`."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        self._check(indices)
        u_NT = self._uniforms(indices)
        out = np.empty(u_NT.shape, dtype=np.int64)
        out[:, 0] = (self._pi_cdf[None, :] <= u_NT[:, :1]).sum(1)
        for t in range(1, u_NT.shape[1]):
            prev = out[:, t - 1]
            k = (self._cdf_VK[prev] <= u_NT[:, t:t + 1]).sum(1)
            out[:, t] = self.successors[prev, k]
        return out


def _irreducible(adj: np.ndarray) -> bool:
    """Every state reachable from state 0 and state 0 reachable from every state."""
    def reach(a: np.ndarray) -> bool:
        seen = np.zeros(a.shape[0], dtype=bool)
        seen[0] = True
        frontier = seen.copy()
        while frontier.any():
            new = a[frontier].any(0) & ~seen
            seen |= new
            frontier = new
        return bool(seen.all())

    return reach(adj) and reach(adj.T)
