"""The two topologies as real processes: `inferline up` alone (bundled Triton) and the suite."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest
import tritonclient.grpc as triton_grpc

from inferline.core.health_wait import wait_until_serving
from inferline.core.ports import free_port, free_ports, port_in_use
from inferline.stats import scrape, total
from inferline.v1 import inference_pb2 as pb
from inferline.v1 import inference_pb2_grpc as pb_grpc
from tests.integration.router_fixtures import DEMO_KEY, ROOT, start_inferline
from tests.waiting import process_running, wait_until

pytestmark = pytest.mark.requires_triton

AUTH = (("authorization", f"Bearer {DEMO_KEY}"),)
REQUEST = pb.PredictRequest(
    route="driver_ranking", entities=[pb.EntityKey(name="driver_id", int64_value=i) for i in (1001, 1002)]
)


def _predict(address: str) -> pb.PredictResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.InferenceStub(channel).Predict(REQUEST, timeout=5, metadata=AUTH)


def _reaches_primary(address: str, tries: int = 5) -> pb.PredictResponse:
    """The first PRIMARY answer of up to ``tries`` calls. Every hop works once one comes; a busy
    machine may degrade a call before it (a feature read over its budget: a full CI run saw it),
    which is the route doing its job, not a broken topology."""
    served = []
    for _ in range(tries):
        response = _predict(address)
        if response.served_by == pb.SERVED_BY_PRIMARY:
            return response
        served.append(pb.ServedBy.Name(response.served_by))
    raise AssertionError(f"no PRIMARY answer in {tries} calls: {served}")


def test_up_starts_and_stops_the_bundled_triton(router_config: pathlib.Path, tmp_path: pathlib.Path) -> None:
    triton_port = free_port()
    env = {"INFERLINE_TRITON__GRPC_PORT": str(triton_port)}
    server = start_inferline(["up", "--config", str(router_config)], tmp_path / "up.log", env=env, timeout_s=180)
    try:
        _reaches_primary(server.address)
        triton = triton_grpc.InferenceServerClient(f"127.0.0.1:{triton_port}")
        assert triton.is_model_ready("driver_ranker")
        log = server.log_tail(20_000)
        assert "tritonserver ready" in log
        triton_pid = int(log.split("started tritonserver pid ")[1].split(",")[0])
        # The default front door: Envoy on the public port, the router behind it on loopback.
        assert "through the gateway" in log
        envoy_pid = int(log.split("started envoy pid ")[1].split(" ")[0])
        with grpc.insecure_channel(server.address) as channel:
            # Only the public services pass the gateway: the internal ones are UNIMPLEMENTED.
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary("/inferline.internal.v1.Degradation/RecordScores")(b"", timeout=5, metadata=AUTH)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # A gateway that dies is started again on the same port.
        os.kill(envoy_pid, signal.SIGKILL)
        wait_until_serving(server.address, 60)
        _reaches_primary(server.address)
        pids = re.findall(r"started envoy pid (\d+)", server.log_tail(50_000))
        assert len(pids) == 2 and int(pids[-1]) != envoy_pid, pids
        envoy_pid = int(pids[-1])
    finally:
        code = server.stop()
    assert code == 0, server.log_tail()
    for pid, name in ((triton_pid, "the bundled Triton"), (envoy_pid, "the gateway")):
        wait_until(lambda pid=pid: not process_running(pid), f"{name} to end with `inferline up`", within_s=15)  # type: ignore[misc]


def test_up_killed_outright_leaves_no_process_behind(router_config: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """The OOM killer's SIGKILL runs no code of `inferline up`'s: the kernel stops its Triton,
    Envoy and router processes (``spawn_tethered``), so the public port is free for the next start."""
    args = ["up", "--config", str(router_config), "--workers", "2"]
    env = {"INFERLINE_GATEWAY__PROTECTED_LANE": "true"}
    server = start_inferline(args, tmp_path / "up.log", env=env, timeout_s=180)
    try:
        log = server.log_tail(1_000_000)
        children = {
            "the bundled Triton": int(log.split("started tritonserver pid ")[1].split(",")[0]),
            "the gateway": int(log.split("started envoy pid ")[1].split(" ")[0]),
            **{
                f"the {kind} pid {pid}": int(pid)
                for kind, pid in re.findall(r"started (router worker|protected lane router) pid (\d+)", log)
            },
        }
        assert len(children) == 4, children  # Triton, Envoy, the second worker (`up` is the first), the lane
        assert all(process_running(pid) for pid in children.values()), children
        up = server.server.proc
        assert up is not None
        up.kill()
        up.wait(timeout=30)  # reaped; its process group, which the children share, left alone
        for name, child in children.items():
            wait_until(lambda child=child: not process_running(child), f"{name} (pid {child}) to stop")  # type: ignore[misc]
        host, port = server.address.rsplit(":", 1)
        assert not port_in_use(host, int(port))  # nothing listens there any more (not even with SO_REUSEPORT)
    finally:
        server.stop()  # SIGKILLs the group: whatever the test let live


def test_up_stopped_during_start_up_stops_at_once(router_config: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """SIGTERM while the routers still warm up (a Triton that does not answer holds each warm-up
    for 30 s) stops `inferline up` and its router processes then, not once start-up has ended:
    longer than Kubernetes' 30 s grace, and the kill after it skips the drain."""
    nothing_there = free_port()
    port, metrics_port = free_ports(2)
    log_path = tmp_path / "up.log"
    command = [
        sys.executable, "-m", "inferline.cli", "up", "--config", str(router_config), "--workers", "2",
        "--triton-url", f"127.0.0.1:{nothing_there}", "--port", str(port), "--metrics-port", str(metrics_port),
    ]  # fmt: skip
    env = {**os.environ, "INFERLINE_GATEWAY__PROTECTED_LANE": "true"}
    with log_path.open("wb") as log:
        up = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # The other routers start beside this process's own warm-up: both are then under way.
        wait_until(
            lambda: len(re.findall(r"started (?:router worker|protected lane router) pid", log_path.read_text())) == 2
        )
        up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=60)
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
    text = log_path.read_text()
    assert code == 0, text[-3000:]
    assert "SIGTERM received during start-up: stopping" in text, text[-3000:]
    assert "Traceback" not in text and "through the gateway" not in text  # stopped before it served
    for pid in map(int, re.findall(r"started (?:router worker|protected lane router) pid (\d+)", text)):
        wait_until(lambda pid=pid: not process_running(pid), f"router process {pid} to stop")  # type: ignore[misc]


def test_suite_topology_reaches_services_over_grpc(
    triton_server: object, router_config: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    features = start_inferline(["serve", "features", "--config", str(router_config)], tmp_path / "features.log")
    post = start_inferline(["serve", "postprocess", "--config", str(router_config)], tmp_path / "post.log")
    env = {"INFERLINE_SERVICES__FEATURES": features.address, "INFERLINE_SERVICES__POSTPROCESS": post.address}
    url = triton_server.grpc_url  # type: ignore[attr-defined]
    router = start_inferline(
        ["serve", "router", "--config", str(router_config), "--triton-url", url], tmp_path / "router.log", env=env
    )
    try:
        response = _reaches_primary(router.address)
        assert [p.rank for p in response.predictions] == [1, 2]
        # Bad input crossing two hops still arrives as the caller's error, not INTERNAL.
        with grpc.insecure_channel(router.address) as channel, pytest.raises(grpc.RpcError) as info:
            bad = pb.PredictRequest(route="driver_ranking", entities=[pb.EntityKey(name="driver_id", string_value="x")])
            pb_grpc.InferenceStub(channel).Predict(bad, timeout=5, metadata=AUTH)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        for server in (router, features, post):
            assert server.stop() == 0, server.log_tail()


def test_serve_rejects_unknown_service_and_missing_triton(router_config: pathlib.Path) -> None:
    base = [sys.executable, "-m", "inferline.cli", "serve"]
    unknown = subprocess.run(
        [*base, "gateway", "--config", str(router_config)], capture_output=True, text=True, cwd=ROOT
    )
    assert unknown.returncode == 2 and "unknown service" in unknown.stderr
    no_triton = subprocess.run(
        [*base, "router", "--config", str(router_config)], capture_output=True, text=True, cwd=ROOT
    )
    assert no_triton.returncode == 2 and "--triton-url" in no_triton.stderr


@pytest.mark.parametrize("key", ["server.port", "server.metrics_port"])
def test_up_refuses_a_port_another_process_listens_on(router_config: pathlib.Path, key: str) -> None:
    port, metrics_port = free_ports(2)
    busy = port if key == "server.port" else metrics_port
    with socket.socket() as other:  # another process's server, as far as a bind can tell
        other.bind(("127.0.0.1", busy))
        other.listen()
        result = subprocess.run(
            [sys.executable, "-m", "inferline.cli", "up", "--config", str(router_config),
             "--port", str(port), "--metrics-port", str(metrics_port)],
            capture_output=True, text=True, cwd=ROOT, timeout=120,
        )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"cannot start: 127.0.0.1:{busy} ({key}): already in use by another process" in result.stderr
    assert "Traceback" not in result.stderr and "started tritonserver" not in result.stderr  # refused before


@pytest.mark.parametrize(
    ("key", "said"),
    [
        ("feature_store.feast_repo", "holds no feature_store.yaml (the directory of a Feast repository)"),
        ("triton.model_repository", "is not a directory"),
    ],
)
def test_up_refuses_a_repository_that_is_not_there(
    router_config: pathlib.Path, tmp_path: pathlib.Path, key: str, said: str
) -> None:
    missing = tmp_path / "not-there"
    env = {**os.environ, f"INFERLINE_{key.upper().replace('.', '__')}": str(missing)}
    result = subprocess.run(
        [sys.executable, "-m", "inferline.cli", "up", "--config", str(router_config), "--port", str(free_port())],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"cannot start: {key}: {missing} {said}" in result.stderr
    assert "Traceback" not in result.stderr and "started tritonserver" not in result.stderr  # refused before


def test_bad_config_stops_start_up_naming_the_key(tmp_path: pathlib.Path, router_config: pathlib.Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(router_config.read_text().replace("max_entities: 100", "max_entitys: 100"))
    result = subprocess.run(
        [sys.executable, "-m", "inferline.cli", "up", "--config", str(bad)], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 2
    assert "routes.driver_ranking.max_entitys" in result.stderr


def test_triton_command_serves_until_sigterm(tmp_path: pathlib.Path, router_config: pathlib.Path) -> None:
    ports = free_ports(3)
    command = [
        sys.executable, "-m", "inferline.cli", "triton", "--config", str(router_config),
        "--grpc-port", str(ports[0]), "--http-port", str(ports[1]), "--metrics-port", str(ports[2]),
    ]  # fmt: skip
    with open(tmp_path / "triton.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{ports[0]}")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if client.is_server_ready() and client.is_model_ready("driver_ranker"):
                    break
            except Exception:  # not listening yet
                pass
            assert process.poll() is None, (tmp_path / "triton.log").read_text()[-3000:]
            time.sleep(0.3)
        else:
            pytest.fail("inferline triton did not become ready")
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
    assert code == 0, (tmp_path / "triton.log").read_text()[-3000:]


@pytest.mark.parametrize(
    "command",
    [["up"], ["serve", "router"]],
    ids=["up", "serve_router"],
)
def test_workers_balance_calls_over_every_router_process(
    command: list[str], triton_server: object, router_config: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    # `up --workers 2` and the suite topology's `serve router --workers 2` alike: Envoy on the
    # port, a second router process beside this one.
    url = triton_server.grpc_url  # type: ignore[attr-defined]
    args = [*command, "--workers", "2", "--config", str(router_config), "--triton-url", url]
    server = start_inferline(args, tmp_path / "inferline.log", timeout_s=180)
    try:
        calls = 40
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            served = [stub.Predict(REQUEST, timeout=5, metadata=AUTH).served_by for _ in range(calls)]
        # Every call answered (an error raises); degraded ones may come on a busy machine.
        assert pb.SERVED_BY_PRIMARY in served and pb.SERVED_BY_UNSPECIFIED not in served, served
        log = server.log_tail(50_000)
        assert "through the gateway" in log
        worker_metrics = int(log.split("started router worker pid ")[1].split("(metrics port ")[1].split(")")[0])
        own, other = _answered(server.metrics_port), _answered(worker_metrics)
        # The gateway balances calls, not connections, round robin: both processes answered,
        # and between them every call.
        assert own > 0 and other > 0 and own + other == calls, (own, other)
    finally:
        code = server.stop()
    assert code == 0, server.log_tail()


def _by_class(metrics_port: int, traffic_class: str) -> float:
    samples = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
    return total(samples, "inferline_requests_total", code="OK", traffic_class=traffic_class)


def test_the_protected_lane_takes_critical_calls_and_the_other_routers_take_over_while_it_is_away(
    triton_server: object, router_config: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    import yaml

    raw = yaml.safe_load(router_config.read_text())
    raw["gateway"]["protected_lane"] = True
    raw["gateway"]["protected_lane_boost"] = 3
    config = tmp_path / "lane.yaml"
    config.write_text(yaml.safe_dump(raw))
    url = triton_server.grpc_url  # type: ignore[attr-defined]
    server = start_inferline(["up", "--config", str(config), "--triton-url", url], tmp_path / "up.log", timeout_s=180)
    lane_pid = 0
    try:
        log = server.log_tail(50_000)
        assert "; protected lane 127.0.0.1:" in log
        started = log.split("started protected lane router pid ")[1]
        lane_pid = int(started.split(" ")[0])
        lane_metrics = int(started.split("(metrics port ")[1].split(")")[0])
        # The lane runs 3 steps of niceness above the router that started it (root may raise
        # it): each one's event loop (its main thread) boosted from there alike.
        up_pid = server.server.pid
        assert up_pid is not None
        assert os.getpriority(os.PRIO_PROCESS, lane_pid) == os.getpriority(os.PRIO_PROCESS, up_pid) - 3
        # It runs no batch job (batch_jobs.run_jobs, whose effect test_batch_jobs_service checks).
        environ = pathlib.Path(f"/proc/{lane_pid}/environ").read_bytes().split(b"\0")
        assert b"INFERLINE_BATCH_JOBS__RUN_JOBS=false" in environ

        def calls(traffic_class: str, n: int) -> None:
            request = pb.PredictRequest(route=REQUEST.route, entities=REQUEST.entities, traffic_class=traffic_class)
            metadata = (*AUTH, ("x-inferline-traffic-class", traffic_class))
            with grpc.insecure_channel(server.address) as channel:
                stub = pb_grpc.InferenceStub(channel)
                served = [stub.Predict(request, timeout=5, metadata=metadata).served_by for _ in range(n)]
            assert pb.SERVED_BY_PRIMARY in served and pb.SERVED_BY_UNSPECIFIED not in served, served

        calls("critical", 10)
        calls("standard", 10)
        # Critical calls went to the lane, the others to the first router, none the other way.
        assert (_by_class(lane_metrics, "critical"), _by_class(lane_metrics, "standard")) == (10, 0)
        assert (_by_class(server.metrics_port, "critical"), _by_class(server.metrics_port, "standard")) == (0, 10)

        # The lane stops answering (stopped, as a process would hang): once Envoy's health checks
        # see it, critical calls reach the other router.
        os.kill(lane_pid, signal.SIGSTOP)
        request = pb.PredictRequest(route=REQUEST.route, entities=REQUEST.entities, traffic_class="critical")
        metadata = (*AUTH, ("x-inferline-traffic-class", "critical"))
        deadline = time.monotonic() + 30
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            while _by_class(server.metrics_port, "critical") == 0:
                assert time.monotonic() < deadline, "critical calls never reached the other router"
                try:
                    stub.Predict(request, timeout=0.5, metadata=metadata)
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err  # the lane's, not yet seen gone
        os.kill(lane_pid, signal.SIGCONT)
    finally:
        if lane_pid and process_running(lane_pid):
            os.kill(lane_pid, signal.SIGCONT)
        code = server.stop()
    assert code == 0, server.log_tail()


@pytest.mark.parametrize("service", ["features", "postprocess", "degradation"])
def test_workers_are_refused_for_a_service_other_than_the_router(service: str, router_config: pathlib.Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "inferline.cli", "serve", service, "--workers", "2", "--config", str(router_config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"--workers is for the router; {service} runs as one process" in result.stderr


def _answered(metrics_port: int) -> float:
    return total(scrape(f"http://127.0.0.1:{metrics_port}/metrics"), "inferline_requests_total", code="OK")
