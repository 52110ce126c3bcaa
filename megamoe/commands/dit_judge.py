"""The judge of `megamoe eval` on a dit run: a trained `vit` classifier (configs/vit_judge.yaml)
on the same shapes image set, which classifies generated samples and whose pooled pre-head
representation is the feature space of KID and FID (torchmetrics, custom extractor).

A judge whose own validation accuracy is below the bound (0.9 by default) is refused: the
class accuracy of samples it judges would say more about the judge than about the samples.

Shapes: B images, D the judge's width, K classes.
"""

from __future__ import annotations

import torch

MIN_JUDGE_ACCURACY = 0.9
SAME_IMAGES = ("image_size", "num_classes", "shapes_seed")   # data fields the two runs share


class JudgeFeatures(torch.nn.Module):
    """uint8 images [B, 3, H, W] → the judge's pooled pre-head features [B, D] (the input of
    its linear head: the final-normed class token, or the token mean). Declares `num_features`
    for torchmetrics' custom feature extractors."""

    def __init__(self, vit, batch: int = 256):
        super().__init__()
        self.vit, self.batch = vit, batch
        self.num_features = int(vit.config.hidden_size)

    @torch.no_grad()
    def features_and_logits(self, images_BCHW: torch.Tensor) -> tuple:
        """(features [B, D], logits [B, K]) in eval mode, `batch` images per forward."""
        from megamoe.models.vit.model import vit_context

        was_training = self.vit.training
        self.vit.eval()
        grabbed, feats, logits = [], [], []
        hook = self.vit.head.register_forward_pre_hook(lambda _m, args: grabbed.append(args[0]))
        try:
            for start in range(0, images_BCHW.shape[0], self.batch):
                part = images_BCHW[start:start + self.batch]
                logits.append(self.vit(part, context=vit_context({})).float())
                feats.append(grabbed.pop().float())
        finally:
            hook.remove()
            self.vit.train(was_training)
        return torch.cat(feats), torch.cat(logits)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images_BCHW)[0]


def check_judge_config(judge_cfg, dit_cfg, judge_dir: str) -> None:
    """ValueError (one line naming --judge and the field) unless the judge is a vit classifier
    of the DiT's image set."""
    if judge_cfg.model.family != "vit":
        raise ValueError(f"--judge {judge_dir}: model.family is {judge_cfg.model.family!r}; the "
                         "judge must be a vit classifier (configs/vit_judge.yaml)")
    for field in ("kind", *SAME_IMAGES):
        mine, theirs = getattr(dit_cfg.data, field), getattr(judge_cfg.data, field)
        if mine != theirs:
            raise ValueError(f"--judge {judge_dir}: data.{field} is {theirs!r}, the dit run's is "
                             f"{mine!r} (the judge must be trained on the same image set)")


def judge_accuracy(engine) -> tuple[float, int]:
    """(validation accuracy, images) of a loaded vit engine: its own validation batches."""
    from megamoe.models.registry import family_datasets
    from megamoe.training.loop import evaluate

    _, valid, _ = family_datasets(engine.cfg)
    iters = engine.cfg.train.eval_iters or 1
    _, extra = evaluate(engine, valid, iters)
    return extra["accuracy"], iters * engine.cfg.train.global_batch_size


def load_judge(judge_dir: str, dit_cfg, min_accuracy: float = MIN_JUDGE_ACCURACY,
               log=print) -> tuple:
    """(JudgeFeatures, its validation accuracy, images it was measured on) of the newest
    checkpoint of `judge_dir`; ValueError when it is not a judge of this image set or its
    accuracy is below `min_accuracy`."""
    from megamoe.checkpoint.load import read_meta, resolve
    from megamoe.commands.convert import checkpoint_config, load_one_rank

    step_dir = resolve(judge_dir, log=log)
    if step_dir is None:
        raise ValueError(f"--judge {judge_dir}: no complete checkpoint")
    check_judge_config(checkpoint_config(step_dir), dit_cfg, judge_dir)
    engine, _, _, meta = load_one_rank(step_dir, log=log)
    accuracy, images = judge_accuracy(engine)
    if accuracy < min_accuracy:
        raise ValueError(f"--judge {judge_dir}: its validation accuracy is {accuracy:.4f} "
                         f"(step {read_meta(step_dir)['step']}, {images} images), below "
                         f"{min_accuracy:g}: its verdicts would mean nothing (train "
                         "configs/vit_judge.yaml to the end, or lower --min-judge-accuracy)")
    log(f"[megamoe] judge {step_dir} (step {meta['step']}): validation accuracy "
        f"{accuracy:.4f} over {images} images")
    return JudgeFeatures(engine.modules[0]), accuracy, images


def to_uint8(images_BCHW: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] → uint8 pixels, as a saved sample would be (round to nearest)."""
    return (images_BCHW.float().clamp(0, 1) * 255).round().to(torch.uint8)


def kid_fid(extractor: torch.nn.Module, real_BCHW: torch.Tensor, fake_BCHW: torch.Tensor, *,
            subset_size: int | None = None, subsets: int = 50, seed: int = 0) -> dict:
    """KID (mean, std over `subsets` random subsets of `subset_size`, default half the smaller
    set) and FID of uint8 `fake` against `real` in the extractor's feature space
    (torchmetrics, float64 statistics)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    n = min(real_BCHW.shape[0], fake_BCHW.shape[0])
    subset_size = subset_size or max(2, n // 2)
    if not 2 <= subset_size <= n:
        raise ValueError(f"KID subset size {subset_size}: must be in [2, {n}] (the sample count)")
    fid = FrechetInceptionDistance(feature=extractor, reset_real_features=True)
    kid = KernelInceptionDistance(feature=extractor, subsets=subsets, subset_size=subset_size)
    for metric in (fid, kid):
        metric.update(real_BCHW, real=True)
        metric.update(fake_BCHW, real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)                  # KID's subsets: torch.randperm
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std),
            "kid_subset_size": subset_size, "kid_subsets": subsets,
            "feature_dims": extractor.num_features}
