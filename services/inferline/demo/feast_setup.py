"""Generate the demo Parquet data, then ``feast apply`` and materialize the online store.

``python -m inferline.demo.feast_setup REPO [--history-only]``. Idempotent: run by ``make
setup`` (through ``scripts/setup_feast.py``) and, in the Kubernetes dev overlay, by the
features pods' init container, which fills their store before the service starts. The
online store ends up holding the latest stats of every demo driver (ids 1001..101000;
``inferline.demo.driver_data`` says which also have an hourly history), or with
``--history-only`` of the first 1,000 only. Uses Feast's own CLI
(``feast apply``, ``feast materialize-incremental``), the same commands an operator runs.
"""

from __future__ import annotations

import datetime as dt
import os
import pathlib
import subprocess
import sys

from inferline.demo.driver_data import FIRST_DRIVER_ID, HISTORY_DRIVERS, hourly_driver_stats

HISTORY_ONLY = "--history-only"
"""Only the drivers with an hourly history (the first ``HISTORY_DRIVERS``): a test that needs a
store of its own (another online store type) and a few drivers skips materialising the long
tail, minutes on a busy machine for drivers it never reads."""


def main(repo: pathlib.Path, history_only: bool = False) -> None:
    data_dir = repo / "data"
    data_dir.mkdir(exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    stats = hourly_driver_stats(now)
    if history_only:
        stats = stats[stats["driver_id"] < FIRST_DRIVER_ID + HISTORY_DRIVERS]
    stats.to_parquet(data_dir / "driver_stats.parquet", index=False)
    feast = pathlib.Path(sys.executable).with_name("feast")
    env = {**os.environ, "FEAST_USAGE": "False"}
    subprocess.run([str(feast), "apply"], cwd=repo, check=True, env=env)
    end = (now + dt.timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%S")
    subprocess.run([str(feast), "materialize-incremental", end], cwd=repo, check=True, env=env)


def cli(argv: list[str]) -> None:
    """``REPO [--history-only]``."""
    main(pathlib.Path(next(a for a in argv if a != HISTORY_ONLY)).resolve(), history_only=HISTORY_ONLY in argv)


if __name__ == "__main__":
    cli(sys.argv[1:])
