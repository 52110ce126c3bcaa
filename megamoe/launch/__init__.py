"""Rank discovery (torchrun, Slurm, MPI, local spawn) and process-group set-up."""

from megamoe.launch.env import RankInfo, discover_rank, init_distributed

__all__ = ["RankInfo", "discover_rank", "init_distributed"]
