"""Reuse Megatron's process groups across re-initialisations of its parallel state.

Megatron-Core 0.16's `destroy_model_parallel` forgets its groups without destroying them, so
every re-initialisation in a long-lived process (the test pool runs hundreds of layouts) leaked
each group's sockets and threads (about 1,500 threads per worker before this). While
`reused_groups()` is active, Megatron's `parallel_state.create_group` (the one call site through
which it creates groups) returns the group made earlier for the same ranks, timeout and
description on the same default group. Only groups of the default backend are reused: the
side groups Megatron creates with `backend="gloo"` (on NCCL runs) are the ones its teardown does
destroy, so they are made afresh. Every rank calls `create_group` in the same order, so every
rank hits or misses the cache together. Applied on every device: it changes no result, only
what is built.
"""

from __future__ import annotations

import contextlib

import torch.distributed as dist

from megatron.core import parallel_state

PATCHED = ("megatron.core.parallel_state", "create_group")

_GROUPS: dict = {}


def _cached_create_group(create_group):
    def create(ranks=None, timeout=None, backend=None, pg_options=None,
               use_local_synchronization=False, group_desc=None):
        kwargs = dict(ranks=ranks, timeout=timeout, backend=backend, pg_options=pg_options,
                      use_local_synchronization=use_local_synchronization, group_desc=group_desc)
        if backend is not None or pg_options is not None or use_local_synchronization:
            return create_group(**kwargs)   # destroyed by Megatron / options compare by identity
        key = (id(dist.group.WORLD), tuple(ranks), timeout, group_desc)
        if key not in _GROUPS:
            _GROUPS[key] = create_group(**kwargs)
        return _GROUPS[key]

    return create


@contextlib.contextmanager
def reused_groups():
    """Inside: `parallel_state.create_group` reuses groups made before."""
    original = parallel_state.create_group
    parallel_state.create_group = _cached_create_group(original)
    try:
        yield
    finally:
        parallel_state.create_group = original
