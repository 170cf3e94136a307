"""Profile the router under steady load: where its CPU goes, per function (py-spy).

Starts ``inferline up`` (the embedded gateway in front unless ``--no-gateway``), drives
``inferline bench`` at ``--rate`` against ``Predict`` or the KServe front door, samples the
router process with py-spy (``--nonblocking``: the router is never paused) for
``--duration`` seconds once the warm-up is over, and prints the router's CPU per answered
request and the functions with the largest self and inclusive shares of its busy time.
The raw samples go to ``benchmarks/results/profile-<front door>-<stamp>.txt`` (flamegraph
input). docs/performance.md says how to read the shares.

    .venv/bin/python benchmarks/profile_router.py --front-door kserve --rate 400
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import sys
import time

from rich.console import Console
from rich.table import Table

from inferline.bench.harness import ServerProcess, health_serving, inferline_up, wait_until
from inferline.bench.profile import fold, process_cpu_s
from inferline.core.ports import free_ports
from inferline.stats import scrape, total

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = pathlib.Path(sys.executable).parent
console = Console()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=pathlib.Path, default=ROOT / "deploy/local/inferline.yaml")
    p.add_argument("--front-door", choices=("predict", "kserve"), default="predict")
    p.add_argument("--rate", type=float, default=400.0, help="requests per second (default 400)")
    p.add_argument("--duration", type=float, default=10.0, help="sampled seconds (default 10)")
    p.add_argument("--warmup", type=float, default=4.0, help="load before sampling starts (default 4)")
    p.add_argument("--no-gateway", action="store_true", help="load the router directly")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--results-dir", type=pathlib.Path, default=ROOT / "benchmarks/results")
    return p.parse_args(argv)


def table(title: str, rows: list[tuple[str, float]]) -> Table:
    t = Table(title=title)
    t.add_column("share %", justify="right")
    t.add_column("function")
    for function, share in rows:
        t.add_row(f"{100 * share:.1f}", function)
    return t


async def profile(a: argparse.Namespace) -> int:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    a.results_dir.mkdir(parents=True, exist_ok=True)
    raw = a.results_dir / f"profile-{a.front_door}-{stamp}.txt"
    port, metrics_port = free_ports(2)
    command = inferline_up(a.config, port, metrics_port, gateway=not a.no_gateway)
    router = ServerProcess("router", f"127.0.0.1:{port}", command, raw.with_suffix(".log"), cwd=ROOT)
    router.start()
    try:
        await wait_until(lambda: health_serving(router.url), "inferline up", router, 120.0)
        assert router.pid is not None
        bench = [
            str(BIN / "inferline"), "bench", "--target", f"{a.front_door}={router.url}", "--rate", str(a.rate),
            "--duration", str(a.duration + a.warmup), "--warmup", "0", "--tenant-key", "inferline-demo-key",
        ]  # fmt: skip
        quiet = asyncio.subprocess.DEVNULL
        load = await asyncio.create_subprocess_exec(*bench, cwd=ROOT, stdout=quiet, stderr=quiet)
        await asyncio.sleep(a.warmup)
        metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        before, cpu_before = scrape(metrics), process_cpu_s(router.pid)
        spy = [str(BIN / "py-spy"), "record", "-p", str(router.pid), "-d", str(int(a.duration)), "-r", "200"]
        sampler = await asyncio.create_subprocess_exec(
            *spy, "-f", "raw", "-o", str(raw), "--nonblocking", stdout=quiet, stderr=quiet
        )
        if await sampler.wait() != 0:
            raise RuntimeError("py-spy failed (it needs ptrace rights over the router: root, or CAP_SYS_PTRACE)")
        after, cpu_after = scrape(metrics), process_cpu_s(router.pid)
        await load.wait()
    finally:
        router.stop()
    answered = total(after, "inferline_requests_total", code="OK") - total(
        before, "inferline_requests_total", code="OK"
    )
    folded = fold(raw.read_text().splitlines(), a.top)
    cpu = cpu_after - cpu_before
    per_call = f"{1000 * cpu / answered:.3f} ms" if answered else "-"
    console.print(
        f"{a.front_door} at {a.rate:g}/s ({'direct' if a.no_gateway else 'through the gateway'}): router "
        f"{cpu:.2f} CPU s over ~{a.duration:g} s, {answered:.0f} answered, {per_call} CPU per answer; "
        f"{folded.samples} samples; raw: {raw}",
        highlight=False,
    )
    console.print(table("self (leaf) share of busy samples", folded.self_share))
    console.print(table("inclusive share of busy samples", folded.inclusive_share))
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(profile(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
