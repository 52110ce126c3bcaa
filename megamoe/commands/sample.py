"""`megamoe sample RUN`: class-conditional images from a `dit` run's newest complete checkpoint
(saved under any layout), loaded whole on one CPU process as `megamoe eval` loads it, sampled
with its EMA weights (megamoe.models.dit.sample), written as a labelled grid PNG.

Every flag is checked, and the checkpoint's family, classes and EMA tensors read from its
files, before the model is built: a bad request costs no load. A progress bar goes to stderr;
the last line of stdout is one JSON object (path, labels, steps, cfg_scale, seed, seconds:
the sampling's wall time, the load excluded).
"""

from __future__ import annotations

import json
import os
import sys
import time

GRID_COLUMNS = 8
TILE_MIN_PX = 96          # tiles are upscaled (nearest) to at least this side
CAPTION_PX = 14


def check_flags(steps: int, cfg_scale: float) -> None:
    if steps < 1:
        raise ValueError(f"--steps={steps}: must be ≥ 1")
    if not cfg_scale >= 0:        # also refuses nan
        raise ValueError(f"--cfg-scale={cfg_scale}: must be ≥ 0 (1: no guidance)")


def class_names(cfg) -> list[str]:
    """The run's class names (`red_circle`, …) of the shapes generator, label order."""
    from megamoe.data.shapes import class_kind_colour

    return ["_".join(reversed(class_kind_colour(c))) for c in range(cfg.data.num_classes)]


def parse_labels(text: str | None, cfg) -> list[int]:
    """`--labels 0,3,5` or class names (`red_circle,blue_square`), mixed as one likes; every
    class once when not given. ValueError naming the flag."""
    names = class_names(cfg)
    n = len(names)
    if text is None:
        return list(range(n))
    out = []
    for item in (s.strip() for s in text.split(",")):
        if item.lower() in names:
            out.append(names.index(item.lower()))
            continue
        try:
            label = int(item)
        except ValueError:
            raise ValueError(f"--labels: {item!r} is neither a class index nor a class name "
                             f"(0..{n - 1} or e.g. {names[0]}, {names[-1]})") from None
        if not 0 <= label < n:
            raise ValueError(f"--labels: {label} is out of range (the run has {n} classes: "
                             f"0..{n - 1})")
        out.append(label)
    return out


def ema_tensors(step_dir: str) -> int:
    """How many EMA tensors (keys `ema.*`) the checkpoint's storage index holds."""
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(step_dir).read_metadata().state_dict_metadata
    return sum(1 for k in keys if k.startswith("ema."))


def _checked_source(src: str, labels: str | None, steps: int):
    """(step_dir, cfg, labels) of a request whose checkpoint is a dit run's with EMA weights."""
    from megamoe.checkpoint.load import CheckpointError, resolve
    from megamoe.commands.convert import checkpoint_config

    step_dir = resolve(src, log=lambda m: print(m, file=sys.stderr))
    if step_dir is None:
        raise CheckpointError(f"{src}: no complete checkpoint")
    cfg = checkpoint_config(step_dir)
    if cfg.model.family != "dit":
        raise ValueError(f"model.family {cfg.model.family!r}: `megamoe sample` samples runs of "
                         f"the dit family ({src})")
    labels_B = parse_labels(labels, cfg)
    T = cfg.model.dit.num_train_timesteps
    if cfg.model.dit.objective == "ddpm" and steps > T:
        raise ValueError(f"--steps={steps}: a ddpm run samples in at most "
                         f"model.dit.num_train_timesteps = {T} steps")
    if not ema_tensors(step_dir):
        raise ValueError(f"RUN {src}: the checkpoint {step_dir} has no EMA weights (no ema.* "
                         "tensors), which sampling uses")
    return step_dir, cfg, labels_B


def grid_image(images_BCHW, captions: list[str], columns: int = GRID_COLUMNS):
    """A PIL image: the images in rows of `columns`, each upscaled and captioned below."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    B, _, H, W = images_BCHW.shape
    scale = max(1, -(-TILE_MIN_PX // max(H, W)))
    th, tw = H * scale, W * scale
    cols, rows = min(columns, B), -(-B // columns)
    pad = 4
    sheet = Image.new("RGB", (cols * (tw + pad) + pad, rows * (th + CAPTION_PX + pad) + pad),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    pixels = (images_BCHW.clamp(0, 1) * 255).round().to(torch.uint8)
    for b in range(B):
        tile = Image.fromarray(np.ascontiguousarray(pixels[b].permute(1, 2, 0).numpy()))
        x = pad + (b % columns) * (tw + pad)
        y = pad + (b // columns) * (th + CAPTION_PX + pad)
        sheet.paste(tile.resize((tw, th), Image.NEAREST), (x, y))
        draw.text((x + 1, y + th + 1), captions[b][: max(4, tw // 6)], fill=(0, 0, 0))
    return sheet


def default_out(step_dir: str, step: int, seed: int) -> str:
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(step_dir)))
    return os.path.join(run_dir, "samples", f"step_{step:07d}_seed_{seed}.png")


def sample_checkpoint(src: str, *, labels: str | None = None, steps: int = 50,
                      cfg_scale: float = 4.0, seed: int = 0, out: str | None = None,
                      progress: bool = True, log=print) -> dict:
    """Sample the newest checkpoint of `src` (a run directory, its checkpoints/ root or a step
    directory), write the grid to `out` and return the JSON line's fields."""
    from megamoe.commands.convert import load_one_rank
    from megamoe.models.dit.sample import sample_images

    check_flags(steps, cfg_scale)
    step_dir, cfg, labels_B = _checked_source(src, labels, steps)
    engine, cfg, step_dir, meta = load_one_rank(step_dir,
                                                log=lambda m: print(m, file=sys.stderr))
    bar = None
    if progress:
        from functools import partial

        from tqdm import tqdm

        bar = partial(tqdm, desc=f"sampling {len(labels_B)} images", unit="step",
                      file=sys.stderr)
    start = time.perf_counter()
    images_BCHW = sample_images(engine.modules, cfg, labels_B, steps=steps,
                                cfg_scale=cfg_scale, seed=seed, progress=bar)
    seconds = time.perf_counter() - start
    step = int(meta["step"])
    out = out or default_out(step_dir, step, seed)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    names = class_names(cfg)
    grid_image(images_BCHW, [f"{y} {names[y]}" for y in labels_B]).save(out)
    figures = {"path": os.path.abspath(out), "labels": labels_B,
               "classes": [names[y] for y in labels_B], "steps": steps,
               "cfg_scale": cfg_scale, "seed": seed, "seconds": round(seconds, 3),
               "checkpoint": step_dir, "step": step, "objective": cfg.model.dit.objective,
               "weights": "ema"}
    log(f"[megamoe] {len(labels_B)} samples of {step_dir} (step {step}; "
        f"{cfg.model.dit.objective}, {steps} steps, CFG scale {cfg_scale:g}, seed {seed}, "
        f"EMA weights) in {seconds:.1f} s: {out}")
    log(json.dumps(figures))
    return figures
