"""A task message whose acknowledgement the broker does not answer (Redis hung: the write times
out) still frees the worker's one prefetch slot, so the worker asks for the next message. On
kombu's in-memory transport, whose QoS is the virtual one Redis's extends, with the write that
Redis's ack and reject make first replaced by a timeout. The hung Redis itself is
tests/integration/test_faults.py."""

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection

from service.core.broker import RUN_JOB
from service.core.settings import get_settings


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("APOPTOSIS_HOME", str(tmp_path / "home"))  # the app makes its broker folder
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.mark.parametrize(("verb", "write"), [("acknowledge", "ack"), ("reject", "reject")])
def test_an_unanswered_ack_or_reject_frees_the_prefetch_slot(
    home: None, verb: str, write: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.runtime.celery_app import app
    from worker.runtime.tasks import run_job

    with Connection("memory://") as connection:
        queue = connection.SimpleQueue("cpu")
        headers, properties, body, _ = app.amqp.as_task_v2(str(uuid.uuid4()), RUN_JOB, ["job"])
        queue.producer.publish(
            body, routing_key="cpu", headers=headers, declare=[queue.queue], **properties
        )
        channel = queue.consumer.channel
        channel.basic_qos(0, 1, False)  # solo pool, prefetch multiplier 1
        message = queue.get(timeout=1)
        assert not channel.qos.can_consume()

        def hung(*_: object, **__: object) -> None:
            raise TimeoutError("Timeout reading from socket")

        monkeypatch.setattr(channel.qos, write, hung)
        request = run_job.Request(
            message,
            on_ack=message.ack_log_error,
            on_reject=message.reject_log_error,
            app=app,
            task=run_job,
            connection_errors=(TimeoutError,),
        )
        getattr(request, verb)()

        assert not message.acknowledged  # the broker never heard of it: Redis redelivers it later
        assert channel.qos.can_consume()
        queue.close()
