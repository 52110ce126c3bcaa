"""The vlm family learns to hear: a short CPU run of configs/vlm_audio.yaml (shrunk: a narrower
encoder and LM, one process) on the generated sounds answers "what sound is this?" on 256
held-out clips at least three times as often as chance (1/8: classes are balanced, so no question
text does better — test_sounds measures the sound-blind baseline), and the two controls show
the answers come from the clip: the same model given each question's neighbour's spectrogram
(a different class in 7 of 8 cases: the class order is a permutation per block of 8) or a
silent one (all zeros) falls to chance or below. A second run trained on silence would show
the same from the other side; its cost (another training run) buys nothing the silent
evaluation does not already show, since a model that reads no audio answers every clip alike.
"""

import os

import numpy as np
import pytest

from megamoe.testing.pool import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "configs", "vlm_audio.yaml")
STEPS, VALID_BATCHES = 60, 8        # 8 × 32 = 256 validation clips
SMALL = [
    "parallel.world_size=1", "parallel.expert=1", "model.num_layers=2", "model.hidden_size=48",
    "model.ffn_hidden_size=96", "model.num_attention_heads=4", "model.num_query_groups=2",
    "model.moe.ffn_hidden_size=64", "model.vlm.encoder_hidden_size=48",
    "model.vlm.encoder_num_attention_heads=4", "model.vlm.encoder_ffn_hidden_size=96",
    f"train.steps={STEPS}", "train.lr=2e-3", "train.warmup_steps=5", "train.eval_iters=0",
    "run.tensorboard=false", "run.progress=false",
]


class SilentClips:
    """A sounds split whose spectrograms are all zeros (the text is unchanged)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def get_batch(self, indices) -> dict:
        batch = dict(self.dataset.get_batch(indices))
        batch["images"] = np.zeros_like(batch["images"])
        return batch


def _train_and_listen(overrides: list) -> dict:
    """Pool task: train STEPS steps, then the validation answer accuracy with the clips' own,
    their neighbours' and silent spectrograms, and the first and last training losses."""
    import torch

    from megamoe.commands.eval_vlm import NeighbourImages
    from megamoe.config import load_config
    from megamoe.data.checks import model_vocab_size
    from megamoe.models.registry import family_datasets
    from megamoe.training.loop import build_engine, evaluate, loader_for
    from megamoe.training.metrics import global_loss

    cfg = load_config(RECIPE, overrides)
    train, valid, vocab = family_datasets(cfg)
    engine = build_engine(cfg, model_vocab_size(cfg, vocab), torch.device("cpu"))
    loader = loader_for(engine, train)
    losses = [global_loss(engine.train_step(loader.step_batches()), engine.grid)
              for _ in range(cfg.train.steps)]
    out = {"losses": losses}
    for name, data in (("own", valid), ("neighbour", NeighbourImages(valid)),
                       ("silent", SilentClips(valid))):
        out[name] = evaluate(engine, data, VALID_BATCHES)[1]["accuracy"]
    return out


@pytest.mark.timeout(300)
def test_a_short_run_tells_sounds_apart_well_above_chance():
    got = run_distributed(_train_and_listen, 1, SMALL)[0]
    chance = 1 / 8
    losses = got["losses"]
    assert np.mean(losses[-5:]) < 0.3 * losses[0], losses
    assert got["own"] >= 3 * chance, got      # measured: 0.68
    # controls: without the clip's own spectrogram the answers are no better than chance
    assert got["neighbour"] <= chance + 0.05, got
    assert got["silent"] <= chance + 0.05, got
    assert got["own"] - max(got["neighbour"], got["silent"]) >= 0.2, got
