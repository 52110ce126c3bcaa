"""megamoe: multimodal Mixture-of-Experts pretraining on Megatron-Core."""

__version__ = "0.1.0"
