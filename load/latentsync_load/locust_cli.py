"""`latentsync-locust ARGS`: locust with this package's locustfile (`locust -f locustfile.py ARGS`)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def main() -> None:
    locust = shutil.which("locust") or str(Path(sys.executable).with_name("locust"))
    if not Path(locust).is_file():  # an optional extra: say how to get it rather than fail in execv
        sys.exit("latentsync-locust: locust is not installed here: pip install 'latentsync-load[locust]' (or locust)")
    os.execv(locust, [locust, "-f", str(LOCUSTFILE), *sys.argv[1:]])
