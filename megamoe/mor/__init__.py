"""Mixture-of-Recursions (Bae et al., arXiv 2507.10524; papers.md §1) on Megatron-Core."""
