"""What the BatchJobs service checks of a request before anything touches a file: paths stay in
the tenant's directories (links followed), numbers and strings are bounded, page tokens are
the service's own, no message names a server path; and the gateway forwards the service."""

from __future__ import annotations

import math
import pathlib
import re

import pytest
import yaml

from inferline.batch.service.request import TenantDirs, _confined, _finite, _text
from inferline.batch.service.servicer import _page_position, _page_token
from inferline.core.config import ConfigError, parse_config
from inferline.core.errors import InvalidInput
from inferline.gateway.render import ROUTER_CLUSTER, render_envoy
from tests.unit.test_gateway_render import SHED, _config, _routes


@pytest.fixture
def base(tmp_path: pathlib.Path) -> pathlib.Path:
    tenant = tmp_path / "in" / "demo"
    (tenant / "sub").mkdir(parents=True)
    (tenant / "sub" / "a.csv").write_text("x\n")
    (tmp_path / "secret.csv").write_text("x\n")
    (tenant / "out.csv").symlink_to(tmp_path / "secret.csv")
    (tenant / "up").symlink_to(tmp_path)
    (tenant / "inside.csv").symlink_to(tenant / "sub" / "a.csv")
    (tenant / "loop").symlink_to(tenant / "loop")
    return tenant.resolve()


@pytest.mark.parametrize(
    ("name", "resolved"),
    [("sub/a.csv", "sub/a.csv"), ("./sub//a.csv", "sub/a.csv"), ("inside.csv", "sub/a.csv"), ("new/dir", "new/dir")],
)
def test_names_inside_the_tenant_directory_resolve(base: pathlib.Path, name: str, resolved: str) -> None:
    assert _confined(base, name, "spec.input") == base / resolved


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("", "required"),
        ("/etc/passwd", "relative"),
        ("sub/../../x", "'..'"),
        ("..", "'..'"),
        ("sub\\..\\x", "relative"),
        ("out.csv", "leads out"),
        ("up/secret.csv", "leads out"),
        ("loop/x", "cannot be resolved"),
        ("a\nb", "control characters"),
        ("a\x00b", "control characters"),
        ("x" * 2000, "longer than"),
    ],
)
def test_names_leading_out_are_refused(base: pathlib.Path, name: str, says: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        _confined(base, name, "spec.input")
    assert refused.value.field == "spec.input"
    assert says in refused.value.message
    assert str(base.parent) not in refused.value.message


def test_messages_never_name_server_paths(tmp_path: pathlib.Path) -> None:
    dirs = TenantDirs(tmp_path / "in" / "t", tmp_path / "out" / "t")
    named = {tmp_path / "in" / "t" / "a" / "x.csv": "a/x.csv", tmp_path / "out" / "t" / "o": "o"}
    text = (
        f"input {tmp_path}/in/t/a/x.csv: unreadable; output {tmp_path}/out/t/o: not empty; "
        f"was '{tmp_path}/in/t/b.csv', now '{tmp_path}/in/t/a/x.csv'; dir {tmp_path}/out/t"
    )
    hidden = dirs.hide(text, named)
    assert str(tmp_path) not in hidden
    assert hidden == "input a/x.csv: unreadable; output o: not empty; was 'b.csv', now 'a/x.csv'; dir ."


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1.0, 1e-9, 1e12])
def test_numbers_are_finite_and_bounded(value: float) -> None:
    with pytest.raises(InvalidInput, match="finite number"):
        _finite("spec.x", value, 0.05, 60.0)


def test_strings_are_bounded() -> None:
    _text("f", "event_ts", 256)
    for bad in ("a\tb", "\x7f", "x" * 257):
        with pytest.raises(InvalidInput):
            _text("f", bad, 256)


def test_page_tokens_round_trip_and_forged_ones_are_refused() -> None:
    assert _page_position(_page_token(42)) == 42
    assert _page_position("") is None
    for forged in ("x", "djE6LTE=", "djI6MQ==", "djE6" + "OQ" * 20, "\u00e9"):
        with pytest.raises(InvalidInput) as refused:
            _page_position(forged)
        assert refused.value.field == "page_token"


@pytest.mark.parametrize("method", ["SubmitBatchJob", "GetBatchJob", "ListBatchJobs", "CancelBatchJob"])
def test_the_gateway_forwards_the_service(method: str) -> None:
    forwarding = [r for r in _routes(render_envoy(_config(shed=SHED))) if "route" in r]  # not "unrouted"
    path = f"/inferline.v1.BatchJobs/{method}"
    clusters = {r["route"]["cluster"] for r in forwarding if re.fullmatch(r["match"]["safe_regex"]["regex"], path)}
    assert clusters == {ROUTER_CLUSTER}  # with Predict, not on the KServe front door's cluster


def _raw_config(tmp_path: pathlib.Path, **batch_jobs: object) -> dict[str, object]:
    raw = yaml.safe_load((pathlib.Path(__file__).parents[2] / "deploy/local/inferline.yaml").read_text())
    raw["batch_jobs"] = batch_jobs
    return raw


def test_the_service_is_off_without_roots_and_paths_resolve_from_the_config(tmp_path: pathlib.Path) -> None:
    assert not parse_config(_raw_config(tmp_path), tmp_path).batch_jobs.enabled
    jobs = parse_config(_raw_config(tmp_path, input_root="in", output_root="out"), tmp_path).batch_jobs
    assert jobs.enabled and (jobs.input_root, jobs.output_root) == (tmp_path / "in", tmp_path / "out")


def test_roots_come_together_and_tenant_names_must_be_directory_names(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match="input_root and output_root together"):
        parse_config(_raw_config(tmp_path, input_root="in"), tmp_path)
    raw = _raw_config(tmp_path, input_root="in", output_root="out")
    raw["tenants"] = {"../x": raw["tenants"]["demo"]}  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"tenants\.\.\./x: with batch_jobs on"):
        parse_config(raw, tmp_path)
