"""`megamoe eval` for the vlm family: what the model reads from the images (or, on the sounds
set, from the clips' spectrograms: "image" below reads "spectrogram", chance is about 1/K).

- `accuracy`: closed-answer questions of the validation split answered exactly (every answer
  token is the argmax under teacher forcing, which is what greedy decoding would produce);
- `chance`: the best image-blind accuracy on the same questions — the majority answer per
  question template, or per exact question text, learned from the training split
  (megamoe.data.scenes.blind_baselines); whichever is higher;
- `shuffled_accuracy`: the same questions with each sample's image replaced by its
  neighbour's (index i + 1): a model that reads the images falls to about `chance`;
- `caption_match`: captions reproduced exactly, next to `caption_chance` (the most frequent
  caption, image-blind);
- the per-modality expert usage of the language model's MoE layers (experts × modality, per
  layer: the share of each modality's routed assignments that each expert received) as a PNG
  next to the checkpoints and in the run's TensorBoard. An MoE encoder's layers are left out:
  every encoder token is an image patch, so their map would have one row and say nothing
  about modality (their expert load is in the training logs as `encoder_layer<N>`).
"""

from __future__ import annotations

import os

import numpy as np

from megamoe.models.vlm.model import IMAGE, TEXT

MODALITY_NAMES = {TEXT: "text", IMAGE: "image"}
BLIND_TRAIN_SAMPLES = 20000    # training samples the image-blind baselines learn from


class NeighbourImages:
    """A scenes split whose sample i carries sample i + 1's image (the text is sample i's)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def get_batch(self, indices) -> dict:
        indices = np.asarray(indices)
        batch = dict(self.dataset.get_batch(indices))
        batch["images"] = self.dataset.get_images((indices + 1) % len(self.dataset))
        return batch


def modality_usage(engine) -> dict:
    """{layer name: {modality id: [E] routed-token counts}} of the LM's MoE layers since the
    last reset (one process: `megamoe eval` loads the model on one rank); not the encoder's
    (module docstring; megamoe.moe.layer records none for them)."""
    from megamoe.moe.layer import MegamoeMoELayer

    out = {}
    for chunk in engine.modules:
        for name, module in chunk.named_modules():
            if isinstance(module, MegamoeMoELayer) and not module.stream:
                out[name.removesuffix(".mlp")] = {m: c.numpy().copy() for m, c in
                                                  sorted(module.modality_usage_acc.items())}
    return out


def reset_modality_usage(engine) -> None:
    from megamoe.moe.layer import MegamoeMoELayer

    for chunk in engine.modules:
        for module in chunk.modules():
            if isinstance(module, MegamoeMoELayer):
                module.modality_usage_acc.clear()


def usage_figure(usage: dict, title: str):
    """One heat map per MoE layer: rows the modalities, columns the experts, each row the
    share of that modality's assignments per expert (rows sum to 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(usage)
    fig, axes = plt.subplots(1, len(layers), figsize=(1.5 + 2.3 * len(layers), 2.6),
                             squeeze=False, sharey=True, constrained_layout=True)
    for i, (ax, layer) in enumerate(zip(axes[0], layers)):
        rows = usage[layer]
        share_ME = np.stack([rows[m] / max(rows[m].sum(), 1) for m in rows])
        im = ax.imshow(share_ME, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_yticks(range(len(rows)), [MODALITY_NAMES.get(m, str(m)) for m in rows])
        ax.tick_params(axis="y", labelleft=i == 0)
        ax.set_xticks(range(share_ME.shape[1]))
        ax.set_xlabel("expert")
        ax.set_title(layer.replace("decoder.layers.", "layer "), fontsize=9)
        for (i, j), v in np.ndenumerate(share_ME):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if v < 0.5 else "black")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="share of the modality")
    fig.suptitle(title, fontsize=10)
    return fig


def write_usage(usage: dict, run_dir: str, step: int, log) -> str | None:
    """The heat map as `<run>/eval/expert_usage_step_<N>.png` and under `eval/expert_usage` in
    the run's TensorBoard; returns the PNG's path (None without MoE layers)."""
    if not usage or not any(usage.values()):
        return None
    fig = usage_figure(usage, f"expert usage by modality (step {step}, validation)")
    os.makedirs(os.path.join(run_dir, "eval"), exist_ok=True)
    path = os.path.join(run_dir, "eval", f"expert_usage_step_{step:07d}.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
    writer.add_figure("eval/expert_usage", fig, global_step=step)
    writer.close()
    log(f"[megamoe] expert usage by modality: {path} (and TensorBoard eval/expert_usage)")
    return path


def blind_figures(cfg, n_valid: int) -> dict:
    """`chance` and `caption_chance` on the first `n_valid` validation samples
    (megamoe.data.scenes.blind_baselines; the sounds set's: megamoe.data.sounds, no
    captions)."""
    d = cfg.data
    if d.kind == "sounds":
        from megamoe.data.sounds import blind_baselines as sound_blind

        # balanced classes: the majority answer of 2000 training questions is as good as any
        base = sound_blind(d.shapes_seed, d.audio.num_classes, 2000, n_valid)
        return {"chance": max(base["template"], base["question"]),
                "chance_per_template": base["template"],
                "chance_per_question": base["question"],
                "chance_uniform": 1.0 / d.audio.num_classes, "caption_chance": 0.0}
    from megamoe.data.scenes import blind_baselines

    base = blind_baselines(d.shapes_seed, d.image_size, d.max_shapes, d.caption_fraction,
                           BLIND_TRAIN_SAMPLES, n_valid)
    return {"chance": max(base["template"], base["question"]),
            "chance_per_template": base["template"],
            "chance_per_question": base["question"],
            "chance_by_template": base["per_template"],
            "caption_chance": base["caption"]}
