"""Session fixture ``postgres_url``: a real PostgreSQL cluster of the tests' own, on a free port.

``initdb`` into a fresh directory (trust auth, user ``inferline``), then ``pg_ctl start``
listening on loopback only, with fsync off (nothing here must survive a power cut); stopped
and removed at teardown. PostgreSQL refuses to run as root, so under root (as on CI) the
cluster runs as the ``postgres`` system user (``runuser``). Each test that needs a clean
database asks ``fresh_schema`` for a URL whose ``search_path`` is a new schema of its own.

The binaries come with Debian's ``postgresql`` package (``make setup`` installs it where it
is missing). A missing binary fails the test: the Postgres job store is tested, not skipped.
"""

from __future__ import annotations

import os
import pathlib
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from inferline.core.ports import LOOPBACK, free_port


def _binary(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(pathlib.Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))), None)
    assert found, f"{name} not found: install PostgreSQL (apt-get install postgresql)"
    return str(found)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    root = pathlib.Path(tempfile.mkdtemp(prefix="inferline-postgres-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        account = pwd.getpwnam("postgres")
        os.chown(root, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, log = root / "data", root / "server.log"
    port = free_port()
    subprocess.run(
        [*as_user, _binary("initdb"), "-D", str(data), "-U", "inferline", "--auth=trust", "-E", "UTF8", "--no-sync"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {root} -c listen_addresses={LOOPBACK} -c fsync=off -c full_page_writes=off"
    started = subprocess.run(
        [*as_user, _binary("pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", options, "start"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert started.returncode == 0, f"postgres did not start: {started.stderr}\n{log.read_text()[-2000:]}"
    try:
        yield f"postgresql://inferline@{LOOPBACK}:{port}/postgres"
    finally:
        subprocess.run(
            [*as_user, _binary("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True, check=False
        )
        shutil.rmtree(root, ignore_errors=True)


def fresh_schema(postgres_url: str) -> str:
    """A URL of the test cluster whose ``search_path`` is a new, empty schema."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return f"{postgres_url}?options={quote(f'-csearch_path={schema}')}"
