"""What the benchmarks share: a scratch PostgreSQL database and a server in a subprocess."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import httpx
from sqlalchemy import Engine, create_engine, text

from models.db import make_engine, normalise_url
from models.migrate import upgrade

ROOT = Path(__file__).resolve().parent.parent


def recreate_database(admin_url: str, name: str, *, drop_only: bool = False) -> None:
    """Drop database `name` (forcing its connections off) and, unless `drop_only`, create it."""
    admin = create_engine(normalise_url(admin_url), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            if not drop_only:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()


def migrated_database(admin_url: str, name: str) -> tuple[str, Engine]:
    """A fresh database `name` beside `admin_url`, migrated: (its URL, an engine on it)."""
    recreate_database(admin_url, name)
    url = normalise_url(admin_url).set(database=name).render_as_string(hide_password=False)
    engine = make_engine(url)
    upgrade(engine)
    return url, engine


def percentile(values: Sequence[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (every core, every process:
    user, nice, system, irq, softirq, steal), from Linux's /proc/stat; None elsewhere."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not first or first[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class CpuMeter:
    """The machine's busy CPU time over a run, minus the benchmark process's own (its load
    generator), per event: what one event costs the service (API, workers, PostgreSQL,
    Redis) in CPU, and so how many events per second the machine's cores allow at most."""

    machine: float | None = None
    own: float = 0.0

    def start(self) -> CpuMeter:
        self.machine, self.own = machine_busy_seconds(), time.process_time()
        return self

    def report(self, events: int) -> str:
        now = machine_busy_seconds()
        if self.machine is None or now is None or events <= 0:
            return "CPU: not measured (no /proc/stat)"
        service = (now - self.machine) - (time.process_time() - self.own)
        per_event = service / events
        cores = os.cpu_count() or 1
        ceiling = cores / per_event if per_event > 0 else float("inf")
        return (
            f"CPU: {service:.1f} s busy across the machine besides the load generator = "
            f"{per_event * 1e6:,.0f} µs per event → at most {ceiling:,.0f} events/s on "
            f"{cores} cores"
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def server(
    command: Callable[[int], list[str]], *, env: Mapping[str, str] | None = None
) -> Iterator[str]:
    """Run `command(port)` in a subprocess (its own core) until `/healthz` answers 200; yield
    its base URL; stop it afterwards (SIGTERM, then SIGKILL after 10 s)."""
    port = free_port()
    with tempfile.NamedTemporaryFile("w+", prefix="bench-server-", suffix=".log") as log:
        proc = subprocess.Popen(
            command(port),
            cwd=ROOT,
            env=dict(env) if env is not None else None,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base_url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise SystemExit(f"the server exited:\n{log.read()[-4000:]}")
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not become healthy within 30 s")
                time.sleep(0.1)
            yield base_url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
