"""The default number of torch threads per process (``[train] threads = 0``)."""

from __future__ import annotations

import pytest

from rangerdl.train.runtime import default_threads, physical_cores


@pytest.mark.parametrize(
    ("cores", "local_world_size", "env", "expected"),
    [
        (8, 1, {}, 8),  # one process: a thread per physical core
        (2, 1, {}, 2),
        (8, 2, {}, 1),  # several processes per node: one each, as torchrun does
        (8, 4, {"LOCAL_WORLD_SIZE": "4"}, 1),
        (8, 4, {"OMP_NUM_THREADS": "3"}, None),  # the user's (or torchrun's) choice stands
        (8, 1, {"OMP_NUM_THREADS": "2"}, None),
        (0, 1, {}, 1),
    ],
)
def test_default_threads(
    cores: int, local_world_size: int, env: dict[str, str], expected: int | None
) -> None:
    assert default_threads(cores, local_world_size, env) == expected


def test_several_processes_per_node_use_one_thread_each() -> None:
    assert default_threads(physical_cores(), 2, {}) == 1


def test_physical_cores_is_at_most_the_usable_cpus() -> None:
    import os

    assert 1 <= physical_cores() <= len(os.sched_getaffinity(0))
