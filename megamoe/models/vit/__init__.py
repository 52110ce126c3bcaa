"""The `vit` family: a ViT / V-MoE image classifier (model, task, family record)."""
