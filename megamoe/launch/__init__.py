"""Rank discovery (torchrun, Slurm, MPI, local spawn) and process-group set-up.

The names below load megamoe.launch.env (and torch) on first use only, so the per-node health
check and the job scripts' helpers (megamoe.launch.health, .rendezvous) start in a fraction of a
second."""

__all__ = ["RankInfo", "discover_rank", "init_distributed"]


def __getattr__(name):
    if name in __all__:
        from megamoe.launch import env

        return getattr(env, name)
    raise AttributeError(f"module 'megamoe.launch' has no attribute {name!r}")
