"""Torch's threads per worker process. Torch sizes its intra-op pool to every core of the
host by default, so three torch workers on two cores run six busy threads on two cores and
each generation takes several times longer than alone. Each worker process instead takes the
cores it may run on divided by the processes of its pool, or ``T2IROUTE_TORCH_THREADS``.

On a GPU worker the threads only feed the device (tokenising, schedulers, PNG encoding): one
or two per process are enough, and the setting is the same."""

from __future__ import annotations

import contextlib
import logging
import os

import torch

log = logging.getLogger(__name__)


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity (taskset, a cgroup cpuset), not
    the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity call on this platform
        return os.cpu_count() or 1


def default_threads(processes: int, cores: int | None = None) -> int:
    """Threads per process so that ``processes`` busy processes never oversubscribe the
    cores."""
    return max(1, (available_cores() if cores is None else cores) // max(1, processes))


def apply_threads(configured: int | None, processes: int) -> int:
    """Set torch's intra-op threads for this process (and its inter-op threads, once, where
    torch still allows it); returns the number set."""
    threads = configured or default_threads(processes)
    torch.set_num_threads(threads)
    # Inter-op threads can be set only before the first parallel op of the process.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(threads)
    log.info("torch threads: %d (%d pool processes)", threads, processes)
    return threads
