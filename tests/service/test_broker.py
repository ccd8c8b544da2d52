"""The embedded (filesystem) broker's folders, made before any process binds a queue."""

import json
from pathlib import Path

from service.core.broker import EXCHANGES, celery_config
from service.core.settings import Settings


def test_each_exchange_table_is_whole_before_any_worker_binds(tmp_path: Path) -> None:
    # kombu creates a table empty and locks it after: a worker starting beside another could
    # read "" and die; a table that is already "[]" is only ever read and rewritten locked
    settings = Settings(home=tmp_path)
    control = tmp_path / "broker" / "control"
    control.mkdir(parents=True)
    bound = [["cpu", "", "cpu"]]
    (control / "cpu.exchange").write_text(json.dumps(bound))

    config = celery_config(settings)

    assert config["broker_transport_options"]["control_folder"] == str(control.resolve())
    tables = {e: json.loads((control / f"{e}.exchange").read_text()) for e in EXCHANGES}
    assert tables == {"cpu": bound, "gpu": [], "celery.pidbox": []}  # a bound one is kept
    assert sorted(p.name for p in control.iterdir()) == sorted(f"{e}.exchange" for e in EXCHANGES)
