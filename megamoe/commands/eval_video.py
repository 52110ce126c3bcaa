"""`megamoe eval` for the vlm family on video (`data.kind: clips`): the clip-blind chance and a
time-reversal control, next to the answer accuracy and the neighbour-clip control that
megamoe.commands.eval_vlm reports for every vlm run.

- `chance`: the best clip-blind accuracy on the same questions — the majority answer per
  template or per exact question text, learned from the training split
  (megamoe.data.clips.blind_baselines), whichever is higher (1/4 by construction);
- `reversed_accuracy`: the same questions with every clip's frames in reverse order. Reversed,
  a shape moves the other way and the shape that appeared first is the one that vanished last
  (megamoe.data.clips), so a model that reads the frames' order falls below `chance`, while one
  that reads only what the frames hold (colours, positions as a set) would keep its accuracy.
"""

from __future__ import annotations

import numpy as np

BLIND_TRAIN_SAMPLES = 4000     # training samples the clip-blind baselines learn from (the
                               # answers are uniform: ~80 per exact question is plenty)


class ReversedClips:
    """A clips split whose sample i carries its own clip with the frames reversed."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def get_batch(self, indices) -> dict:
        batch = dict(self.dataset.get_batch(np.asarray(indices)))
        batch["images"] = np.ascontiguousarray(batch["images"][:, ::-1])   # [B, T, C, H, W]
        return batch


def clip_blind_figures(cfg, n_valid: int) -> dict:
    """`chance` (and its parts) on the first `n_valid` validation questions."""
    from megamoe.data.clips import blind_baselines

    d = cfg.data
    base = blind_baselines(d.shapes_seed, d.num_frames, d.image_size, BLIND_TRAIN_SAMPLES,
                           n_valid)
    return {"chance": max(base["template"], base["question"]),
            "chance_per_template": base["template"], "chance_per_question": base["question"],
            "chance_by_template": base["per_template"]}


def video_figures(engine, valid, sweep, log) -> dict:
    """The time-reversal control: accuracy on `valid`'s questions with reversed clips.
    `sweep(loader, what)` sums the eval stats over the evaluated batches."""
    from megamoe.training import metrics as M
    from megamoe.training.loop import loader_for

    total = sweep(loader_for(engine, ReversedClips(valid)), " (each clip reversed in time)")
    out = {"reversed_accuracy": M.global_mean(total, engine.grid, "correct", "questions")}
    log(f"[megamoe] with every clip reversed in time: answer accuracy "
        f"{out['reversed_accuracy']:.4f}")
    return out
