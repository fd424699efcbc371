"""A closed-loop HTTP load generator: `clients` connections, each sending its next request
as soon as the previous answer is read, for a fixed time.

asyncio on raw keep-alive connections, because on a 2-core machine the load generator
shares the CPU with the server: an HTTP client library would spend more of it per
request than the server's trivial view does.
"""

import asyncio
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Run:
    """What one load run saw: latencies of answered requests, statuses, wall time."""

    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, answered requests
    statuses: dict[int, int] = field(default_factory=dict)
    failures: int = 0  # connection errors: no HTTP answer at all

    @property
    def ok(self) -> int:
        return sum(n for status, n in self.statuses.items() if 200 <= status < 300)

    @property
    def errors(self) -> int:
        return self.failures + sum(n for s, n in self.statuses.items() if not 200 <= s < 300)

    def per_second(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        """In milliseconds."""
        return percentile(self.latencies, q) * 1000


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q% of values at or below."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


Request = Callable[[], bytes]


def get(host: str, port: int, path: str) -> Request:
    raw = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    return lambda: raw


def post_json(host: str, port: int, path: str, body: bytes, *, idempotent: bool) -> Request:
    """A POST of `body`; with `idempotent`, a fresh Idempotency-Key on every request, as
    a careful client sends (a new key costs the shop nothing: its unique constraint only
    speaks up on a retry)."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    )

    def request() -> bytes:
        key = f"Idempotency-Key: {uuid.uuid4()}\r\n" if idempotent else ""
        return f"{head}{key}\r\n".encode() + body

    return request


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, keep the connection); the body is read and dropped."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed before an answer")
    status = int(status_line.split()[1])
    length, close = 0, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection" and value.strip().lower() == "close":
            close = True
    await reader.readexactly(length)
    return status, not close


async def _client(
    host: str, port: int, request: Request, until: float, budget: list[int], run: Run
) -> None:
    connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    while time.perf_counter() < until and budget[0] != 0:
        budget[0] -= 1  # one event loop: no lock needed
        try:
            if connection is None:
                connection = await asyncio.open_connection(host, port)
            reader, writer = connection
            started = time.perf_counter()
            writer.write(request())
            status, keep = await _read_answer(reader)
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
            run.failures += 1
            connection = None
            await asyncio.sleep(0.01)
            continue
        run.latencies.append(time.perf_counter() - started)
        run.statuses[status] = run.statuses.get(status, 0) + 1
        if not keep:
            writer.close()
            connection = None
    if connection is not None:
        connection[1].close()


def load(
    host: str, port: int, request: Request, *, clients: int, seconds: float, limit: int | None
) -> Run:
    """Run `clients` closed-loop clients for `seconds`, or until `limit` requests were
    sent; requests in flight at the end are counted when they answer (the wall time
    includes them)."""

    async def main() -> Run:
        run = Run()
        started = time.perf_counter()
        until, budget = started + seconds, [-1 if limit is None else limit]
        await asyncio.gather(
            *(_client(host, port, request, until, budget, run) for _ in range(clients))
        )
        run.seconds = time.perf_counter() - started
        return run

    return asyncio.run(main())


def mixed(
    host: str, port: int, requests: dict[str, Request], *, clients: int, seconds: float
) -> dict[str, Run]:
    """`load` with the clients shared out between the requests, a Run for each: variants
    measured in the same seconds share whatever else the machine does meanwhile (a
    checkpoint, a vacuum, a neighbour), which one variant after the other do not."""

    async def main() -> dict[str, Run]:
        runs = {kind: Run() for kind in requests}
        kinds = [list(requests)[index % len(requests)] for index in range(clients)]
        started = time.perf_counter()
        until, budget = started + seconds, [-1]
        await asyncio.gather(
            *(_client(host, port, requests[kind], until, budget, runs[kind]) for kind in kinds)
        )
        for run in runs.values():
            run.seconds = time.perf_counter() - started
        return runs

    return asyncio.run(main())


def paced(host: str, port: int, request: Request, *, rate: float, seconds: float) -> Run:
    """Open loop: a request every 1/rate s whatever the answers, each on its own
    connection. Latency counts from the moment the request was due, so a server that
    falls behind shows it (no coordinated omission)."""
    return paced_mixed(host, port, {"": request}, rate=rate, seconds=seconds)[""]


def paced_mixed(
    host: str, port: int, requests: dict[str, Request], *, rate: float, seconds: float
) -> dict[str, Run]:
    """`paced`, the requests taking turns (`rate` in all), a Run for each (see `mixed`)."""

    async def one(request: Request, due: float, run: Run) -> None:
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request())
            status, _ = await _read_answer(reader)
            writer.close()
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
            run.failures += 1
            return
        run.latencies.append(time.perf_counter() - due)
        run.statuses[status] = run.statuses.get(status, 0) + 1

    async def main() -> dict[str, Run]:
        runs = {kind: Run() for kind in requests}
        kinds, pending = list(requests), []
        started = time.perf_counter()
        for index in range(max(1, round(rate * seconds))):
            due = started + index / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            kind = kinds[index % len(kinds)]
            pending.append(asyncio.create_task(one(requests[kind], due, runs[kind])))
        await asyncio.gather(*pending)
        for run in runs.values():
            run.seconds = time.perf_counter() - started
        return runs

    return asyncio.run(main())
