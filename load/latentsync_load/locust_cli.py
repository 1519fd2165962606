"""`latentsync-locust ARGS`: locust with this package's locustfile (`locust -f locustfile.py ARGS`)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def main() -> None:
    locust = shutil.which("locust") or str(Path(sys.executable).with_name("locust"))
    os.execv(locust, [locust, "-f", str(LOCUSTFILE), *sys.argv[1:]])
