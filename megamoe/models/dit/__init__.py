"""The `dit` family: a class-conditional diffusion transformer (DiT / DiT-MoE) in pixel space
(model, task, objective, EMA, family record)."""
