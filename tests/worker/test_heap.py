import gc
from collections.abc import Iterator

import pytest

from worker.runtime import heap


@pytest.fixture()
def thawed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(heap, "_after_first_job", [False])
    gc.unfreeze()
    yield
    gc.unfreeze()  # the rest of the test run collects as usual


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_start_freezes_what_is_alive_and_a_job_garbage_is_still_collected(thawed: None) -> None:
    alive = _Cycle()
    assert heap.freeze_imports() > 0
    assert not _walked(alive)
    _Cycle()  # unreachable at once: only the cycle collector frees it
    assert gc.collect() > 0


def test_only_the_first_job_freezes_again(thawed: None) -> None:
    heap.freeze_imports()
    imported = _Cycle()  # what the first job leaves for good (the modules it imported)
    heap.job_done()
    assert not _walked(imported)  # frozen: the collector never looks at it again
    later = _Cycle()
    heap.job_done()
    assert _walked(later)


def _walked(obj: object) -> bool:
    return any(o is obj for o in gc.get_objects())
