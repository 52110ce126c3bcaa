"""The built-in Markov corpus (exact entropy rate, samples a function of the index only) and
batches as a function of consumed samples, independent of the data-parallel size."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megamoe.data.batches import build_datasets, global_batch_indices, rank_microbatches
from megamoe.data.markov import MarkovCorpus

# P below: π solves π = πP. State 0: π0 = 0.9 π0 + 0.3 π2 → π0 = 3 π2; state 1:
# π1 = 0.1 π0 + 0.5 π1 → π1 = 0.2 π0 = 0.6 π2; Σπ = 4.6 π2 = 1 → π = (15, 3, 5) / 23.
P3 = [[0.9, 0.1, 0.0], [0.0, 0.5, 0.5], [0.3, 0.0, 0.7]]
PI3 = np.array([15, 3, 5]) / 23


def _h(*p):
    return -sum(x * math.log(x) for x in p)


def _conditional_entropy(seq: np.ndarray, V: int) -> float:
    """Plug-in estimate of H(X_{t+1} | X_t) from one sequence, in nats."""
    counts = np.zeros((V, V))
    np.add.at(counts, (seq[:-1], seq[1:]), 1)
    p = counts / counts.sum(1, keepdims=True).clip(min=1)
    h_V = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0).sum(1)
    return float(counts.sum(1) / counts.sum() @ h_V)


def test_hand_computed_chain():
    corpus = MarkovCorpus.from_matrix(P3)
    assert np.allclose(corpus.pi, PI3, atol=1e-12)
    by_hand = 15 / 23 * _h(0.9, 0.1) + 3 / 23 * _h(0.5, 0.5) + 5 / 23 * _h(0.3, 0.7)
    assert math.isclose(corpus.entropy_rate, by_hand, rel_tol=1e-10)
    assert np.allclose(corpus.transition_matrix(), P3)
    # a periodic-looking chain with a zero diagonal: π = (0.4, 0.4, 0.2), H = 0.4 log 2
    other = MarkovCorpus.from_matrix([[0, 1, 0], [0.5, 0, 0.5], [1, 0, 0]])
    assert math.isclose(other.entropy_rate, 0.4 * math.log(2), rel_tol=1e-10)


def test_samples_stay_on_the_chain_and_start_from_pi():
    corpus = MarkovCorpus.from_matrix(P3, seq_length=8, num_samples=20_000)
    x = corpus.get_batch(np.arange(20_000))
    P = np.array(P3)
    assert (P[x[:, :-1], x[:, 1:]] > 0).all()
    for t in (0, 8):           # stationary: every position has marginal π
        freq = np.bincount(x[:, t], minlength=3) / len(x)
        assert np.abs(freq - PI3).max() < 0.015, (t, freq)


def test_empirical_conditional_entropy_matches_entropy_rate():
    corpus = MarkovCorpus(vocab_size=64, branching=4, seed=7, seq_length=400_000, num_samples=1)
    assert 0.7 < corpus.entropy_rate < math.log(4) - 0.2     # clearly below log(branching)
    seq = corpus[0]
    assert abs(_conditional_entropy(seq, 64) - corpus.entropy_rate) < 0.02 * corpus.entropy_rate
    # negative control: shuffling keeps the unigram counts but breaks the chain
    shuffled = np.random.default_rng(0).permutation(seq)
    assert _conditional_entropy(shuffled, 64) > 1.5 * corpus.entropy_rate


def test_small_chain_empirical_entropy():
    corpus = MarkovCorpus.from_matrix(P3, seq_length=200_000, num_samples=1)
    est = _conditional_entropy(corpus[0], 3)
    assert abs(est - corpus.entropy_rate) < 0.02 * corpus.entropy_rate


def test_sample_is_a_function_of_seed_split_and_index_only():
    a = MarkovCorpus(seq_length=32, num_samples=1000)
    b = MarkovCorpus(seq_length=32, num_samples=50)          # another size, same samples
    assert all((a[i] == b[i]).all() for i in range(50))
    assert a[3].dtype == np.int64 and a[3].shape == (33,)
    assert not (a[3] == a[4]).all()
    assert (a.get_batch([5, 3, 7]) == np.stack([a[5], a[3], a[7]])).all()
    assert (MarkovCorpus(seq_length=16)[3] == a[3][:17]).all()   # longer samples extend
    assert not (MarkovCorpus(seed=8, seq_length=32)[3] == a[3]).all()
    with pytest.raises(IndexError):
        a[1000]


def test_train_and_valid_streams_are_disjoint():
    train = MarkovCorpus(split="train", num_samples=2000)
    valid = MarkovCorpus(split="valid", num_samples=2000)
    rows = {tuple(r) for r in train.get_batch(np.arange(2000)).tolist()}
    assert not rows & {tuple(r) for r in valid.get_batch(np.arange(2000)).tolist()}
    again = MarkovCorpus(split="train", num_samples=2000)           # negative control
    assert rows == {tuple(r) for r in again.get_batch(np.arange(2000)).tolist()}
    assert (train.transition_matrix() == valid.transition_matrix()).all()   # same chain


def test_bad_arguments():
    with pytest.raises(ValueError, match="irreducible"):
        MarkovCorpus.from_matrix([[1, 0], [0.5, 0.5]])
    with pytest.raises(ValueError, match="sum to 1"):
        MarkovCorpus.from_matrix([[0.5, 0.4], [0.5, 0.5]])
    with pytest.raises(ValueError, match="split"):
        MarkovCorpus(split="test")
    with pytest.raises(ValueError, match="branching"):
        MarkovCorpus(vocab_size=4, branching=5)


def test_global_batch_indices_wrap():
    assert global_batch_indices(8, 4, 10).tolist() == [8, 9, 0, 1]


class _SampleIds:
    """Sample i is S+1 copies of i, so a micro-batch shows which samples it holds."""

    def __len__(self):
        return 1000

    def __getitem__(self, i):
        return np.full(9, i, dtype=np.int64)


def test_batches_do_not_depend_on_dp_size():
    data, G, consumed = _SampleIds(), 16, 990

    def step(mbs, dp, consumed=consumed):
        """Sample ids of micro-batch m of every rank, concatenated in rank order: [M][mbs·dp]."""
        per_rank = [rank_microbatches(data, consumed, G, mbs, r, dp) for r in range(dp)]
        return [sum((per_rank[r][m]["tokens"][:, 0].tolist() for r in range(dp)), [])
                for m in range(G // (mbs * dp))]

    # the step is samples consumed … consumed + G − 1 (mod N), in order
    assert sum(step(4, 1), []) == [(consumed + j) % 1000 for j in range(G)]
    # equal for every DP size at a fixed micro-batch size: the union of the step's samples
    union = {dp: sorted(sum(step(2, dp), [])) for dp in (1, 2, 4, 8)}
    assert union[1] == union[2] == union[4] == union[8]
    # equal for a fixed mbs·dp: micro-batch m across ranks, in rank order
    assert step(4, 1) == step(2, 2) == step(1, 4)
    # negative controls: the next step is other samples; another mbs·dp groups them differently
    assert not set(union[1]) & set(sum(step(2, 1, consumed + G), []))
    assert step(8, 1) != step(2, 2)


def test_dp_ranks_together_see_one_process_batch_of_markov_samples():
    corpus = MarkovCorpus(seq_length=8, num_samples=1000)
    ref = rank_microbatches(corpus, 32, 16, 4, 0, 1)
    for m, mb in enumerate(ref):
        parts = [rank_microbatches(corpus, 32, 16, 2, r, 2)[m] for r in range(2)]
        for k in mb:
            assert torch.equal(mb[k], torch.cat([p[k] for p in parts]))


def test_microbatch_contents():
    corpus = MarkovCorpus(seq_length=8, num_samples=100)
    mbs = rank_microbatches(corpus, 0, 8, 2, 1, 2)
    assert len(mbs) == 2
    mb = mbs[0]                                  # rank 1, micro-batch 0: samples 2, 3
    assert {k: (tuple(v.shape), v.dtype) for k, v in mb.items()} == {
        "tokens": ((2, 8), torch.int64), "labels": ((2, 8), torch.int64),
        "loss_mask": ((2, 8), torch.float32), "position_ids": ((2, 8), torch.int64),
        "sample_index": ((2,), torch.int64)}
    assert mb["sample_index"].tolist() == [2, 3]    # global positions, not dataset indices
    assert torch.equal(mb["tokens"][1], torch.as_tensor(corpus[3][:-1]))
    assert torch.equal(mb["labels"][1], torch.as_tensor(corpus[3][1:]))
    assert torch.equal(mb["position_ids"][0], torch.arange(8)) and bool(mb["loss_mask"].all())
    with pytest.raises(ValueError, match="not a multiple"):
        rank_microbatches(corpus, 0, 12, 4, 0, 2)


def test_build_datasets_markov():
    cfg = SimpleNamespace(kind="markov", path=None, tokenizer=None, valid_fraction=0.05,
                          markov_vocab_size=32, markov_branching=3, markov_seed=5)
    train, valid, vocab = build_datasets(cfg, 16, seed=0)
    assert vocab == 32 and len(train) == 1_000_000 and len(valid) == 4096
    assert train[999_999].shape == (17,) and train[999_999].max() < 32
    assert math.isclose(train.entropy_rate, valid.entropy_rate)
    with pytest.raises(ValueError, match="data.kind"):
        build_datasets(SimpleNamespace(kind="webdataset"), 16, 0)
