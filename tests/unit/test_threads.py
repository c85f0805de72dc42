"""Torch threads per worker process never oversubscribe the cores the pool runs on."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from workers.app.threads import apply_threads, available_cores, default_threads


@pytest.fixture
def restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("processes", "cores", "threads"), [(1, 8, 8), (3, 8, 2), (4, 2, 1), (2, 2, 1), (0, 4, 4)]
)
def test_the_default_divides_the_cores_among_the_pool_processes(
    processes: int, cores: int, threads: int
) -> None:
    assert default_threads(processes, cores=cores) == threads


def test_a_configured_count_wins_and_the_default_follows_the_affinity(
    restore_threads: None,
) -> None:
    assert apply_threads(3, processes=8) == 3 and torch.get_num_threads() == 3
    expected = max(1, available_cores() // 2)
    assert apply_threads(None, processes=2) == expected == torch.get_num_threads()
