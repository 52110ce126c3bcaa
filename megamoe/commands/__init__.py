"""The commands behind the CLI: train, submit, convert, generate, eval, sample. They build
engines and load checkpoints, so they sit above every library package. This module stays light
(the CLI imports it before parsing, to keep --help fast)."""

import sys


def error(msg: str) -> int:
    """One error line on stderr; the CLI's exit code for a user's error."""
    print(f"megamoe: error: {msg}", file=sys.stderr)
    return 2


def fast_shutdown() -> None:
    """End the process group (convert and generate open a one-rank one): left to interpreter
    exit, gloo's threads can be destroyed while joinable and the process aborts ("terminate
    called without an active exception", exit -6) after its work is done. Then collect garbage
    once and freeze what is left: Python's shutdown otherwise runs repeated full collections
    over torch's and Megatron's objects, seconds per process."""
    import gc

    dist = sys.modules.get("torch.distributed")   # not imported by --help, config, recipes
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
    gc.freeze()
