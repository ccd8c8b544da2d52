"""The engine is a pure library: importing it loads no web, queue or database code."""

import subprocess
import sys


def test_engine_import_loads_no_service_stack() -> None:
    code = (
        "import sys, worker.engine\n"
        "loaded = [m for m in ('fastapi', 'celery', 'sqlalchemy', 'service', 'transformers')"
        " if m in sys.modules]\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert out.stdout.strip() == ""
