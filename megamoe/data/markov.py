"""Built-in corpus: an order-1 Markov chain with a known entropy rate.

Every state has `branching` successors with Dirichlet-drawn probabilities (plus state+1, which
makes the chain irreducible and aperiodic). A sample starts in a state drawn from the stationary
distribution π, so the best possible next-token cross-entropy at every position is the entropy
rate H = Σ_s π_s H(P_s·); a model whose loss goes below it sees the future.
Sample i depends on (seed, split, i) only, so the data order is a function of the sample index.
"""

from __future__ import annotations

import numpy as np

_SPLITS = {"train": 0, "valid": 1}


class MarkovCorpus:
    def __init__(self, vocab_size: int = 64, branching: int = 4, seed: int = 7,
                 seq_length: int = 64, num_samples: int = 1_000_000, split: str = "train",
                 concentration: float = 0.5, transition: np.ndarray | None = None):
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        self.vocab_size, self.seq_length, self.num_samples = vocab_size, seq_length, num_samples
        self.seed, self.split = seed, split
        self.P = transition if transition is not None else self._random_transition(
            vocab_size, branching, seed, concentration)
        assert np.allclose(self.P.sum(1), 1.0)
        self.cdf = np.cumsum(self.P, axis=1)
        self.cdf[:, -1] = 1.0
        self.pi = self._stationary(self.P)
        self.pi_cdf = np.cumsum(self.pi)
        self.pi_cdf[-1] = 1.0

    @classmethod
    def from_matrix(cls, transition, seq_length: int = 64, num_samples: int = 1000,
                    seed: int = 0, split: str = "train") -> "MarkovCorpus":
        P = np.asarray(transition, dtype=np.float64)
        return cls(vocab_size=P.shape[0], seed=seed, seq_length=seq_length,
                   num_samples=num_samples, split=split, transition=P)

    @staticmethod
    def _random_transition(V: int, branching: int, seed: int, concentration: float) -> np.ndarray:
        rng = np.random.default_rng(seed)
        P = np.zeros((V, V))
        for s in range(V):
            succ = set(rng.choice(V, size=branching, replace=False).tolist()) | {(s + 1) % V}
            succ = sorted(succ)
            P[s, succ] = rng.dirichlet(np.full(len(succ), concentration))
            if P[s, (s + 1) % V] < 1e-3:          # keep the chain irreducible
                P[s, (s + 1) % V] += 1e-3
                P[s] /= P[s].sum()
        return P

    @staticmethod
    def _stationary(P: np.ndarray) -> np.ndarray:
        pi = np.full(P.shape[0], 1.0 / P.shape[0])
        for _ in range(10_000):
            nxt = pi @ P
            if np.abs(nxt - pi).max() < 1e-15:
                break
            pi = nxt
        return pi / pi.sum()

    @property
    def entropy_rate(self) -> float:
        with np.errstate(divide="ignore", invalid="ignore"):
            h_rows = -np.where(self.P > 0, self.P * np.log(self.P), 0.0).sum(1)
        return float(self.pi @ h_rows)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], int(i) % self.num_samples])
        u = rng.random(self.seq_length + 1)
        out = np.empty(self.seq_length + 1, dtype=np.int64)
        out[0] = np.searchsorted(self.pi_cdf, u[0], side="right")
        for t in range(1, self.seq_length + 1):
            out[t] = np.searchsorted(self.cdf[out[t - 1]], u[t], side="right")
        return np.minimum(out, self.vocab_size - 1)
