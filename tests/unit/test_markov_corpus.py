"""The built-in corpus: deterministic per index, disjoint splits, exact entropy rate, and batches
that depend on consumed samples only (not on the data-parallel size)."""

import math

import numpy as np
import torch

from megamoe.data.batches import rank_microbatches
from megamoe.data.markov import MarkovCorpus


def test_entropy_rate_of_a_hand_computed_chain():
    # P = [[0, 1, 0], [0.5, 0, 0.5], [1, 0, 0]]: π solves π = πP → π = (0.4, 0.4, 0.2);
    # only state 1 is random (H = log 2), so H = 0.4 · log 2.
    corpus = MarkovCorpus.from_matrix([[0, 1, 0], [0.5, 0, 0.5], [1, 0, 0]])
    assert np.allclose(corpus.pi, [0.4, 0.4, 0.2], atol=1e-9)
    assert math.isclose(corpus.entropy_rate, 0.4 * math.log(2), rel_tol=1e-9)


def test_samples_follow_the_chain_and_are_deterministic():
    corpus = MarkovCorpus.from_matrix([[0, 1, 0], [0.5, 0, 0.5], [1, 0, 0]], seq_length=32)
    a, b = corpus[5], corpus[5]
    assert (a == b).all() and len(a) == 33
    allowed = {(0, 1), (1, 0), (1, 2), (2, 0)}
    assert all((int(x), int(y)) in allowed for x, y in zip(a[:-1], a[1:]))
    assert not (corpus[5] == corpus[6]).all()


def test_empirical_conditional_entropy_matches_entropy_rate():
    corpus = MarkovCorpus(vocab_size=16, branching=3, seed=3, seq_length=256)
    counts = np.zeros((16, 16))
    for i in range(400):
        s = corpus[i]
        np.add.at(counts, (s[:-1], s[1:]), 1)
    p = counts / counts.sum(1, keepdims=True).clip(min=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.where(p > 0, p * np.log(p), 0)).sum(1)
    empirical = (counts.sum(1) / counts.sum()) @ h
    assert abs(empirical - corpus.entropy_rate) < 0.02 * corpus.entropy_rate


def test_train_and_valid_streams_differ():
    train = MarkovCorpus(split="train")
    valid = MarkovCorpus(split="valid")
    assert not any((train[i] == valid[i]).all() for i in range(20))


def test_global_batch_is_independent_of_dp_size():
    corpus = MarkovCorpus(seq_length=8, num_samples=1000)

    def union(dp):
        rows = []
        for r in range(dp):
            for mb in rank_microbatches(corpus, 48, 16, 2, r, dp):
                rows += [tuple(t.tolist()) for t in mb["tokens"]]
        return sorted(rows)

    assert union(1) == union(2) == union(4)
    first = rank_microbatches(corpus, 48, 16, 2, 0, 2)[0]
    assert torch.equal(first["labels"][:, :-1], first["tokens"][:, 1:])
