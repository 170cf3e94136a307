"""Generate the demo Parquet data, ``feast apply`` and materialize: ``scripts/setup_feast.py REPO [--history-only]``.

``make setup`` runs it; the code is ``inferline.demo.feast_setup`` (the image's dev init
container runs the same module).
"""

from __future__ import annotations

import sys

from inferline.demo.feast_setup import cli

if __name__ == "__main__":
    cli(sys.argv[1:])
