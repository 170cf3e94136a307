"""Generate the demo Parquet data, then ``feast apply`` and materialize the online store.

Idempotent: run by ``make setup``. The online store ends up holding the latest stats of
every demo driver (ids 1001..101000; ``inferline.demo.driver_data`` says which also have an
hourly history). Uses Feast's own CLI (``feast apply``, ``feast materialize-incremental``),
the same commands an operator runs.
"""

from __future__ import annotations

import datetime as dt
import os
import pathlib
import subprocess
import sys

from inferline.demo.driver_data import hourly_driver_stats


def main(repo: pathlib.Path) -> None:
    data_dir = repo / "data"
    data_dir.mkdir(exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    hourly_driver_stats(now).to_parquet(data_dir / "driver_stats.parquet", index=False)
    feast = pathlib.Path(sys.executable).with_name("feast")
    env = {**os.environ, "FEAST_USAGE": "False"}
    subprocess.run([str(feast), "apply"], cwd=repo, check=True, env=env)
    end = (now + dt.timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%S")
    subprocess.run([str(feast), "materialize-incremental", end], cwd=repo, check=True, env=env)


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]).resolve())
