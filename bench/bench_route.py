"""Router overhead benchmark: streaming chat completions sent straight to an engine and
through `kubetrain route` in front of it (one variant at weight 100, its SQLite log in the
temporary folder, so the durable log's write is part of what is measured), same prompts,
same engine, one run.

The engine is the built-in server (`kubetrain serve`) on the tiny model bench_serve
exports, or, with `--engine-url URL`, an OpenAI server already running (vLLM on a GPU
machine: `python -m bench.bench_route --engine-url http://127.0.0.1:8000`); its model
name is read from its `GET /v1/models`.

At each concurrency (1, 8, 32), blocks of requests go direct and routed in turns (the
order swapped every round, so background load hits both alike); each client has its own
connection and sends its requests one after another. Per request, from the client side:
TTFT (sending to the first chunk with text) and the time per token, (last text chunk -
first) / (text chunks - 1): a token that ends inside a UTF-8 character is held back and
sent with the next, so there are fewer chunks than tokens (`mean_chunks`,
`mean_tokens`), alike on both sides (`outputs_identical`: greedy). Targets (issue 16):
the router adds <= 5 ms to the p50 TTFT on loopback, and its p50 time per token is
<= 1.05x the engine's; `pass` fields record them, the run never fails on them.

Also reported, to tell where time goes: the time to the response headers (the router's
request path), the engine's own TTFT from its /metrics and the TTFT outside the engine
(`ttft_outside_engine_added_mean_ms`: at high concurrency the engine's queue reacts to
how requests arrive, which the client-side p50s include), and the time from the last
text chunk to `[DONE]`, which the router holds back until its log write is on disk
(`tail_added_p50_ms`).

The engine runs torch with one intra-op thread, as in bench_serve: client, router and
engine share this machine's cores. `--pin` puts the engine on one CPU and the router and
the clients on the others (writes route_pinned.json), as when the router has a pod of
its own."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.bench_serve import _export as export_tiny_model
from bench.bench_serve import _free_port as free_port

ROOT = Path(__file__).resolve().parents[1]
TARGET_TTFT_ADDED_MS = 5.0
TARGET_PER_TOKEN_RATIO = 1.05
CONCURRENCY = (1, 8, 32)
SERVICE = "bench"
START_TIMEOUT_S = 120
MIN_BLOCK = 16
CLIENT_KEEPALIVE_S = 2.0
MESSAGES = [
    "the quick brown fox jumps over the lazy dog",
    "kubernetes schedules pods onto nodes with free gpus",
    "a small model learns to continue plain text",
    "training loss goes down as the tokens go by",
    "every pod writes its metrics to the run folder",
    "the router logs each answer before it ends",
]


def run(
    quick: bool = False,
    *,
    engine_url: str | None = None,
    concurrency: tuple[int, ...] = CONCURRENCY,
    rounds: int | None = None,
    per_client: int | None = None,
    max_tokens: int | None = None,
    min_block: int = MIN_BLOCK,
    pin: bool = False,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Direct vs routed at each concurrency. `rounds` blocks per side and concurrency, each
    block `per_client` requests from each of `concurrency` clients (at least `min_block`
    requests in all: low concurrencies are cheap, and their p50s need the samples).
    `pin`: the engine on one CPU, router and clients on the others, as when the router
    runs in a pod of its own (so their CPU time cannot slow the engine down)."""
    rounds = rounds or (2 if quick else 6)
    per_client = per_client or (2 if quick else 4)
    max_tokens = max_tokens or (16 if quick else 32)
    engine_cpus = other_cpus = None
    if pin:
        allowed = sorted(os.sched_getaffinity(0))
        if len(allowed) < 2:
            raise ValueError(f"pin needs at least 2 CPUs; this process may use {allowed}")
        engine_cpus, other_cpus = {allowed[0]}, set(allowed[1:])
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp, ExitStack() as stack:
        work = Path(tmp)
        with _affinity(engine_cpus):  # a child keeps the CPUs it was started with
            engine = stack.enter_context(_engine(engine_url, work, max(concurrency)))
        with _affinity(other_cpus):
            router = stack.enter_context(_router(engine, work))
            measured = asyncio.run(
                _measure(engine, router, concurrency, rounds, per_client, min_block, max_tokens)
            )
        logged = httpx.get(f"{router.url}/stats", timeout=30).json()["variants"]["a"]
        store_fs = _filesystem(work)
    by_c = {str(c): _summary(sides["direct"], sides["routed"]) for c, sides in measured.items()}
    results: dict[str, Any] = {"concurrency": by_c}
    sent_routed = sum(len(sides["routed"].rows) for sides in measured.values())
    results["targets"] = {
        "ttft_added_p50_ms": f"<= {TARGET_TTFT_ADDED_MS}",
        "per_token_ratio_p50": f"<= {TARGET_PER_TOKEN_RATIO}",
    }
    results["pass"] = all(row["ttft"]["pass"] and row["per_token"]["pass"] for row in by_c.values())
    results["setup"] = {
        "engine": engine.description,
        "engine_model": engine.model,
        "router": "kubetrain route, one variant at weight 100",
        "store": f"SQLite (WAL, synchronous=FULL) on {store_fs}",
        # The warm-up requests are logged too.
        "routed_requests_logged": logged["requests"],
        "routed_requests_measured": sent_routed,
        "endpoint": "/v1/chat/completions, stream, include_usage",
        "rounds": rounds,
        "requests_per_client_per_block": per_client,
        "requests_per_block_at_least": min_block,
        "max_tokens": max_tokens,
        "prompts": len(MESSAGES),
        "cpus": os.cpu_count(),
        "pinned": None
        if engine_cpus is None or other_cpus is None
        else {
            "engine": "not started here" if engine_url else sorted(engine_cpus),
            "router_and_clients": sorted(other_cpus),
        },
        "load_average_1_5_15_before": [round(x, 2) for x in load_before],
        "load_average_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
    }
    return results


@contextmanager
def _affinity(cpus: set[int] | None) -> Iterator[None]:
    """This process, and the children it starts meanwhile, on `cpus` (None: as it is)."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


class _Server:
    def __init__(self, url: str, model: str, description: str) -> None:
        self.url, self.model, self.description = url, model, description


@contextmanager
def _process(name: str, argv: list[str], work: Path, port: int) -> Iterator[str]:
    """`kubetrain ARGV` as a child process, until it answers /readyz; yields its URL."""
    log_path = work / f"{name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kubetrain_cli.main", *argv],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not become ready:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _served_model(url: str) -> str:
    response = httpx.get(f"{url}/v1/models", timeout=30)
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])


@contextmanager
def _engine(engine_url: str | None, work: Path, max_concurrency: int) -> Iterator[_Server]:
    if engine_url is not None:
        url = engine_url.rstrip("/")
        yield _Server(url, _served_model(url), f"external OpenAI server at {url}")
        return
    model_dir = export_tiny_model(work)
    port = free_port()
    argv = ["serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--log-level", "warning", "--max-queue", "256"]
    # Admission caps the batch; let the highest concurrency measured batch in full.
    argv += ["--max-concurrency", str(max_concurrency)]
    with _process("engine", argv, work, port) as url:
        description = "kubetrain serve, builtin tiny-llama, random weights, CPU, 1 torch thread"
        yield _Server(url, _served_model(url), description)


@contextmanager
def _router(engine: _Server, work: Path) -> Iterator[_Server]:
    port = free_port()
    variant = f"name=a,url={engine.url},version=bench,weight=100,upstreamModel={engine.model}"
    argv = ["route", "--model", SERVICE, "--variant", variant, "--store", str(work / "router.db")]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    with _process("router", argv, work, port) as url:
        yield _Server(url, SERVICE, "kubetrain route")


async def _one(http: httpx.AsyncClient, model: str, i: int, max_tokens: int) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": MESSAGES[i % len(MESSAGES)]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        # Asked on both sides, so the router passes usage through instead of asking for it.
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    times: list[float] = []
    text: list[str] = []
    tokens = 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        headers = time.perf_counter()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                raise RuntimeError(f"the stream reported an error: {chunk['error']}")
            for choice in chunk.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    times.append(time.perf_counter())
                    text.append(content)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    if len(times) < 2:
        raise RuntimeError(f"request {i}: {len(times)} text chunks; raise max_tokens")
    return {
        "prompt": i % len(MESSAGES),
        "headers_s": headers - start,
        "ttft_s": times[0] - start,
        "per_token_s": (times[-1] - times[0]) / (len(times) - 1),
        "tail_s": end - times[-1],
        "total_s": end - start,
        "chunks": len(times),
        "tokens": tokens,
        "text": "".join(text),
    }


async def _block(
    https: list[httpx.AsyncClient], model: str, per_client: int, max_tokens: int
) -> list[dict[str, Any]]:
    """One client per connection at once, each sending `per_client` requests one after
    another."""

    async def client(c: int, http: httpx.AsyncClient) -> list[dict[str, Any]]:
        return [await _one(http, model, c * per_client + k, max_tokens) for k in range(per_client)]

    rows = await asyncio.gather(*(client(c, http) for c, http in enumerate(https)))
    return [row for per in rows for row in per]


@dataclass
class _Side:
    """One side's requests at one concurrency, and the engine's own TTFT over its blocks."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    engine_ttft_sum_s: float = 0.0
    engine_ttft_count: int = 0

    def engine_ttft_s(self) -> float | None:
        """The engine's mean TTFT over this side's requests; None if it reports none."""
        return self.engine_ttft_sum_s / self.engine_ttft_count if self.engine_ttft_count else None


async def _engine_ttft(http: httpx.AsyncClient) -> tuple[float, int] | None:
    """The engine's TTFT histogram (sum, count) from its /metrics: from the request's arrival
    at the engine to its first token (`kubetrain_serve_...`, vLLM's `vllm:...`); None when
    it has none."""
    response = await http.get("/metrics")
    if response.status_code != 200:
        return None
    total, count, seen = 0.0, 0, False
    for line in response.text.splitlines():
        name, _, value = line.partition(" ")
        name = name.split("{", 1)[0]
        if name.endswith("time_to_first_token_seconds_sum"):
            total, seen = total + float(value.split()[0]), True
        elif name.endswith("time_to_first_token_seconds_count"):
            count += int(float(value.split()[0]))
    return (total, count) if seen else None


async def _measure(
    engine: _Server,
    router: _Server,
    concurrency: tuple[int, ...],
    rounds: int,
    per_client: int,
    min_block: int,
    max_tokens: int,
) -> dict[int, dict[str, _Side]]:
    # A client per connection, as independent users are: httpx's pool bookkeeping grows
    # with its connections (encode/httpx#3215), and one shared pool would time that too.
    # Idle connections are dropped well before the servers' keep-alive timeout (uvicorn's
    # 5 s): a block of the other side can idle them that long, and a request sent as the
    # server closes its connection fails (httpx.ReadError).
    limits = httpx.Limits(max_connections=1, keepalive_expiry=CLIENT_KEEPALIVE_S)
    servers = {"direct": engine, "routed": router}
    clients = {
        name: [
            httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits)
            for _ in range(max(concurrency))
        ]
        for name, server in servers.items()
    }
    metrics = clients["direct"][0]
    try:
        measured: dict[int, dict[str, _Side]] = {}
        for c in concurrency:
            for name, server in servers.items():  # connections open, router's upstream too
                await _block(clients[name][:c], server.model, 1, max_tokens)
            sides = {"direct": _Side(), "routed": _Side()}
            each = max(per_client, -(-min_block // c))
            for r in range(rounds):
                order = ("direct", "routed") if r % 2 == 0 else ("routed", "direct")
                for name in order:
                    before = await _engine_ttft(metrics)
                    block = await _block(clients[name][:c], servers[name].model, each, max_tokens)
                    after = await _engine_ttft(metrics)
                    sides[name].rows += block
                    if before is not None and after is not None:
                        sides[name].engine_ttft_sum_s += after[0] - before[0]
                        sides[name].engine_ttft_count += after[1] - before[1]
            measured[c] = sides
        return measured
    finally:
        for http in [http for side in clients.values() for http in side]:
            await http.aclose()


def _quantiles(values: list[float]) -> tuple[float, float]:
    """p50 and p95 (inclusive method: defined for any number of samples)."""
    if len(values) == 1:
        return values[0], values[0]
    cuts = statistics.quantiles(values, n=20, method="inclusive")
    return statistics.median(values), cuts[18]


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def _ms_or_none(seconds: float | None) -> float | None:
    return None if seconds is None else _ms(seconds)


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.fmean(row[key] for row in rows)


def _summary(direct_side: _Side, routed_side: _Side) -> dict[str, Any]:
    direct, routed = direct_side.rows, routed_side.rows

    def q(rows: list[dict[str, Any]], key: str) -> tuple[float, float]:
        return _quantiles([row[key] for row in rows])

    (d_ttft50, d_ttft95), (r_ttft50, r_ttft95) = q(direct, "ttft_s"), q(routed, "ttft_s")
    (d_tok50, d_tok95), (r_tok50, r_tok95) = q(direct, "per_token_s"), q(routed, "per_token_s")
    (d_tail50, _), (r_tail50, _) = q(direct, "tail_s"), q(routed, "tail_s")
    (d_head50, _), (r_head50, _) = q(direct, "headers_s"), q(routed, "headers_s")
    (d_total50, _), (r_total50, _) = q(direct, "total_s"), q(routed, "total_s")
    added = (r_ttft50 - d_ttft50) * 1e3
    ratio = r_tok50 / d_tok50
    d_engine, r_engine = direct_side.engine_ttft_s(), routed_side.engine_ttft_s()
    # Greedy: a prompt's answer must not depend on the path (nor on the batch it ran in).
    texts: dict[int, set[str]] = {}
    for row in direct + routed:
        texts.setdefault(row["prompt"], set()).add(row["text"])
    return {
        "requests": {"direct": len(direct), "routed": len(routed)},
        "ttft": {
            "direct_p50_ms": _ms(d_ttft50),
            "direct_p95_ms": _ms(d_ttft95),
            "routed_p50_ms": _ms(r_ttft50),
            "routed_p95_ms": _ms(r_ttft95),
            "added_p50_ms": round(added, 3),
            "added_p95_ms": _ms(r_ttft95 - d_ttft95),
            # Judged on the number reported, so a reader never sees 1.05 <= 1.05 fail.
            "pass": round(added, 3) <= TARGET_TTFT_ADDED_MS,
        },
        "per_token": {
            "direct_p50_ms": _ms(d_tok50),
            "direct_p95_ms": _ms(d_tok95),
            "routed_p50_ms": _ms(r_tok50),
            "routed_p95_ms": _ms(r_tok95),
            "ratio_p50": round(ratio, 3),
            "pass": round(ratio, 3) <= TARGET_PER_TOKEN_RATIO,
        },
        # Where added TTFT comes from: the router's request path (to the response headers),
        # and the TTFT outside the engine: the client's minus the engine's own (arrival to
        # first token, from its /metrics). At high concurrency the engine's queue reacts to
        # how requests arrive (a router spreads a burst), so the client-side p50s alone
        # can hide the router's time or exaggerate it; the outside-engine part cannot.
        "headers_added_p50_ms": _ms(r_head50 - d_head50),
        "engine_ttft_mean_ms": {"direct": _ms_or_none(d_engine), "routed": _ms_or_none(r_engine)},
        "ttft_outside_engine_added_mean_ms": (
            _ms((_mean(routed, "ttft_s") - r_engine) - (_mean(direct, "ttft_s") - d_engine))
            if d_engine is not None and r_engine is not None
            else None
        ),
        "tail_added_p50_ms": _ms(r_tail50 - d_tail50),
        "total_p50_ms": {"direct": _ms(d_total50), "routed": _ms(r_total50)},
        "mean_chunks": round(statistics.fmean(row["chunks"] for row in direct + routed), 1),
        "mean_tokens": round(statistics.fmean(row["tokens"] for row in direct + routed), 1),
        "outputs_identical": all(len(seen) == 1 for seen in texts.values()),
    }


def _filesystem(path: Path) -> str:
    """The file system type under `path` (fsync's cost depends on it: tmpfs makes it free)."""
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    resolved = str(path.resolve())
    for line in mounts:
        _, point, fstype, *_ = line.split()
        if resolved.startswith(point.rstrip("/") + "/") and len(point) > len(best):
            best, kind = point, fstype
    return kind


Bar = tuple[str, float, float, str]


def plot_bars(results: dict[str, Any]) -> tuple[list[Bar], list[Bar]]:
    """(label, value, target, 'max') bars for bench/run_all.py's plot: the TTFT the router
    adds at each concurrency (ms, absolute), and its per-token ratio at each (ratios)."""
    by_c = results["concurrency"]
    added: list[Bar] = [
        (
            f"router TTFT added\nc={c}, p50 (ms)",
            row["ttft"]["added_p50_ms"],
            TARGET_TTFT_ADDED_MS,
            "max",
        )
        for c, row in by_c.items()
    ]
    ratios: list[Bar] = [
        (
            f"router per-token\nrouted / direct, c={c}",
            row["per_token"]["ratio_p50"],
            TARGET_PER_TOKEN_RATIO,
            "max",
        )
        for c, row in by_c.items()
    ]
    return added, ratios


def plot(results: dict[str, Any], path: Path) -> None:
    """p50 (bar) and p95 (tick) TTFT and time per token, direct vs routed, per concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_c = results["concurrency"]
    levels = list(by_c)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, title in zip(axes, ("ttft", "per_token"), ("TTFT", "time per token"), strict=True):
        for k, side in enumerate(("direct", "routed")):
            xs = [i + (k - 0.5) * 0.38 for i in range(len(levels))]
            p50 = [by_c[c][key][f"{side}_p50_ms"] for c in levels]
            p95 = [by_c[c][key][f"{side}_p95_ms"] for c in levels]
            ax.bar(xs, p50, width=0.36, label=f"{side} p50", color=("tab:blue", "tab:orange")[k])
            ax.plot(xs, p95, "_", markersize=18, color="black", label="p95" if k else None)
        for i, c in enumerate(levels):
            row = by_c[c][key]
            note = f"+{row['added_p50_ms']:.1f} ms" if key == "ttft" else f"x{row['ratio_p50']:.3f}"
            top = max(row["direct_p95_ms"], row["routed_p95_ms"])
            color = "tab:green" if row["pass"] else "tab:red"
            ax.annotate(
                note, (i, top), xytext=(0, 6), textcoords="offset points", ha="center", color=color
            )
        ax.set_xticks(range(len(levels)), [f"c={c}" for c in levels])
        ax.set_ylabel("ms")
        ax.set_ylim(top=ax.get_ylim()[1] * 1.1)  # room for the notes
        ax.set_title(title)
        ax.legend(fontsize=8)
    target = (
        f"targets: TTFT +{TARGET_TTFT_ADDED_MS:g} ms, per token x{TARGET_PER_TOKEN_RATIO} (p50)"
    )
    fig.suptitle(f"kubetrain route vs the engine directly; {target}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    import argparse
    from functools import partial

    from bench.alone import RESULTS, run_alone

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter requests")
    parser.add_argument(
        "--engine-url",
        help="an OpenAI server already running (e.g. vLLM on a GPU) instead of the "
        "built-in engine on the tiny model",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the engine on one CPU, the router and the clients on the others",
    )
    args = parser.parse_args()
    name = "route_pinned" if args.pin else "route"  # make bench's figures are unpinned
    run_alone(partial(run, engine_url=args.engine_url, pin=args.pin), f"{name}.json")
    plot(json.loads((RESULTS / f"{name}.json").read_text()), RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()
