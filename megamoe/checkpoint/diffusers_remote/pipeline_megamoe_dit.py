"""The class-conditional sampling pipeline of a megamoe `dit` export (saved in the folder as
pipeline.py; imports torch, numpy and diffusers only). Load and sample with

    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    images = pipe(class_labels=[0, 3], num_inference_steps=25, guidance_scale=2.0, seed=0).images

Its loop is megamoe's sampler (megamoe.models.dit.sample, `megamoe sample`), so that for the
same seed, steps and guidance scale the images are megamoe's:
- the folder's scheduler (FlowMatchEulerDiscreteScheduler with shift 1 for rectified flow: σ
  from 1 to 0 in Euler steps, the transformer seeing σ·T; DDPMScheduler for DDPM, ancestral
  steps), set to `num_inference_steps`;
- classifier-free guidance with the conditional and unconditional (null class) halves in one
  batch, pred = u + s·(c − u); at s = 1 the conditional half alone;
- noise from (seed, position in the request): image b's initial noise is numpy's
  default_rng(SeedSequence([seed, 0x5A3, 0, b])) normals, DDPM's step noise a torch generator
  seeded from SeedSequence([seed, 0x5A3, 1, b]) — so one image alone equals the same position
  inside a larger request. A torch `generator` instead draws the noise diffusers' way
  (not megamoe's).
- output: images in [0, 1] (output_type "pt": a float tensor [B, C, H, W], before any
  quantisation; "np": float [B, H, W, C]; "pil": PIL images, quantised to uint8).
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from typing import Optional, Sequence, Union

import numpy as np
import torch

from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

STREAM = 0x5A3


def _seed_of(seed: int, position: int, what: int) -> int:
    state = np.random.SeedSequence([seed, STREAM, what, position]).generate_state(1, np.uint64)
    return int(state[0])


def initial_noise(seed: int, positions: Sequence[int], shape_CHW: tuple) -> torch.Tensor:
    return torch.from_numpy(np.stack([
        np.random.default_rng(_seed_of(seed, int(p), 0)).standard_normal(shape_CHW,
                                                                          dtype=np.float32)
        for p in positions]))


class MegamoeDiTPipeline(DiffusionPipeline):
    """transformer: MegamoeDiTTransformer2DModel (the folder's transformer/); scheduler:
    FlowMatchEulerDiscreteScheduler or DDPMScheduler (module docstring)."""

    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    def save_pretrained(self, save_directory, **kwargs):
        """diffusers' save plus this folder's code: diffusers records a custom class by the
        module path of its cached copy, which another process cannot import."""
        super().save_pretrained(save_directory, **kwargs)
        shutil.copyfile(inspect.getfile(type(self)), os.path.join(save_directory, "pipeline.py"))
        model_file = inspect.getfile(type(self.transformer))
        for name in (os.path.basename(model_file), "routers_megamoe.py"):
            shutil.copyfile(os.path.join(os.path.dirname(model_file), name),
                            os.path.join(save_directory, "transformer", name))
        path = os.path.join(save_directory, "model_index.json")
        with open(path) as f:
            index = json.load(f)
        index["_class_name"] = ["pipeline", type(self).__name__]
        index["transformer"] = [os.path.basename(model_file)[:-3], type(self.transformer).__name__]
        with open(path, "w") as f:
            json.dump(index, f, indent=2)

    @torch.no_grad()
    def __call__(self, class_labels: Union[int, Sequence[int], torch.Tensor],
                 num_inference_steps: int = 25, guidance_scale: float = 1.0,
                 seed: Optional[int] = 0, generator: Optional[torch.Generator] = None,
                 positions: Optional[Sequence[int]] = None, output_type: str = "pil",
                 return_dict: bool = True):
        c = self.transformer.config
        labels_B = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps}: must be ≥ 1")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale={guidance_scale}: must be ≥ 0")
        if labels_B.numel() and not (0 <= labels_B.min() and labels_B.max() <= c.num_classes):
            raise ValueError(f"class_labels {labels_B.tolist()}: must be in [0, "
                             f"{c.num_classes}] ({c.num_classes} is the null class)")
        B, device = labels_B.numel(), self._execution_device
        positions = list(range(B)) if positions is None else [int(p) for p in positions]
        shape_CHW = (c.in_channels, c.sample_size, c.sample_size)
        ddpm = "DDPM" in type(self.scheduler).__name__
        if generator is None:
            x_BCHW = initial_noise(seed, positions, shape_CHW)
            step_gens = ([torch.Generator().manual_seed(_seed_of(seed, p, 1)) for p in positions]
                         if ddpm else None)
        else:
            x_BCHW = randn_tensor((B, *shape_CHW), generator=generator, dtype=torch.float32)
            step_gens = generator if ddpm else None
        self.scheduler.set_timesteps(num_inference_steps)
        guided = guidance_scale != 1.0
        labels_in = (torch.cat([labels_B, torch.full_like(labels_B, c.num_classes)]) if guided
                     else labels_B).to(device)
        dtype = self.transformer.dtype
        for t in self.progress_bar(self.scheduler.timesteps):
            x_in = torch.cat([x_BCHW, x_BCHW]) if guided else x_BCHW
            t_in = torch.full((x_in.shape[0],), float(t), dtype=torch.float32, device=device)
            pred = self.transformer(x_in.to(device, dtype), t_in, labels_in).sample.float().cpu()
            if guided:
                cond, uncond = pred.chunk(2)
                pred = uncond + guidance_scale * (cond - uncond)
            if step_gens is None:
                x_BCHW = self.scheduler.step(pred, t, x_BCHW, return_dict=False)[0]
            else:
                x_BCHW = self.scheduler.step(pred, t, x_BCHW, generator=step_gens,
                                             return_dict=False)[0]
        images = ((x_BCHW.float() + 1) / 2).clamp(0, 1)
        if output_type == "np":
            images = images.permute(0, 2, 3, 1).numpy()
        elif output_type == "pil":
            images = self.numpy_to_pil(images.permute(0, 2, 3, 1).numpy())
        elif output_type != "pt":
            raise ValueError(f"output_type={output_type!r}: choose pil, np or pt")
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
