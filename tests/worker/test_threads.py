"""A worker's torch thread pool: the cores it may use, shared by the host's workers."""

import os

import pytest
import torch

from service.core.settings import Settings
from worker.runtime import threads


@pytest.mark.parametrize(
    ("cores", "given", "workers", "expected"),
    [(8, 0, 1, 8), (8, 0, 4, 2), (2, 0, 4, 1), (8, 3, 4, 3)],
)
def test_threads_are_the_workers_share_of_the_cores_unless_set(
    monkeypatch: pytest.MonkeyPatch, cores: int, given: int, workers: int, expected: int
) -> None:
    monkeypatch.setattr(threads, "cores", lambda: cores)
    settings = Settings(worker_threads=given, workers_per_host=workers)

    assert threads.threads_for(settings) == expected


def test_configure_sets_torchs_pool() -> None:
    before = torch.get_num_threads()
    try:
        assert threads.configure(Settings(worker_threads=1)) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("count", "sequential"), [(1, True), (3, True), (4, False), (8, False)])
def test_checkpoints_load_without_a_thread_pool_beside_fewer_torch_threads(
    monkeypatch: pytest.MonkeyPatch, count: int, sequential: bool
) -> None:
    monkeypatch.delenv(threads.SEQUENTIAL_LOADING, raising=False)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)

    threads.use(count)

    assert (os.environ.get(threads.SEQUENTIAL_LOADING) == "1") is sequential


def test_an_operators_choice_of_loading_stands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(threads.SEQUENTIAL_LOADING, "0")
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)

    threads.use(1)

    assert os.environ[threads.SEQUENTIAL_LOADING] == "0"
