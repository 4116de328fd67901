#!/usr/bin/env python3
"""Our TorchServe path side by side with a peer serving stack doing the same work.

The peer is LitServe (pinned in requirements-dev.txt) serving the same tiny pipeline through
the same core (``GenerationService``: validation, one batched pipeline call, encoding, the
same JSON reply) with the same batching settings as the TorchServe model it is compared
with (``max_batch_size`` = ``batchSize``, ``batch_timeout`` = ``maxBatchDelay``). So what
differs is the serving stack alone: TorchServe's frontend, worker and our engine process
against LitServe's FastAPI server and its worker.

``make bench`` calls ``measure_peers``; run alone, ``python scripts/bench_peers.py serve``
is the LitServe server it starts (one process group, ended when the bench ends), and
``python scripts/bench_peers.py identical`` puts two identical processes of our core side by
side the same way: how far apart two equal stacks come out on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import litserve
from fastapi import HTTPException

REPO = Path(__file__).resolve().parents[1]
# This checkout's code first, not the checkout a shared venv's editable install names.
sys.path[:0] = [str(REPO / "handler"), str(REPO / "jobs"), str(REPO / "scripts")]

from bench_report import percentile  # noqa: E402
from sdxl_jobs.processes import Managed, wait_http  # noqa: E402


# --- The peer server. ------------------------------------------------------------------------

class SdxlApi(litserve.LitAPI):
    """Our core behind LitServe: the same work as our TorchServe handler."""

    def __init__(self, model_dir: str, config: dict, **batching):
        super().__init__(**batching)
        self.model_dir, self.config = model_dir, config

    def setup(self, device):
        from sdxl_serve.engine import load_engine
        from sdxl_serve.service import GenerationService
        from sdxl_serve.settings import Settings

        engine = load_engine(self.model_dir, Settings.from_mapping(self.config))
        engine.warm_up()
        self.service = GenerationService(engine, "1.0")

    def decode_request(self, request):
        from sdxl_serve.service import Incoming

        return Incoming(request)  # LitServe has parsed the JSON; the contract validates

    def batch(self, inputs):
        return list(inputs)

    def predict(self, items):
        return self.service.handle(items)

    def unbatch(self, output):
        return list(output)

    def encode_response(self, reply):
        if reply.status != 200:
            raise HTTPException(reply.status, reply.json())
        return reply.json()


def serve(port: int, model_dir: str, config: dict, max_batch_size: int,
          batch_timeout_s: float) -> None:
    """Run LitServe on loopback ``port`` until killed."""
    api = SdxlApi(model_dir, config, max_batch_size=max_batch_size,
                           batch_timeout=batch_timeout_s)
    server = litserve.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=300)
    server.run(host="127.0.0.1", port=port, num_api_servers=1, generate_client_file=False,
               log_level="warning")


def peer_process(port: int, model_dir: Path, config: dict, max_batch_size: int,
                 batch_timeout_s: float, log_path: Path,
                 env: dict[str, str] | None = None) -> Managed:
    """The LitServe server as a child in its own session, stopped with its whole group
    (LitServe's worker processes included)."""
    return Managed([sys.executable, __file__, "serve", "--port", str(port),
                    "--model-dir", str(model_dir), "--config", json.dumps(config),
                    "--max-batch-size", str(max_batch_size),
                    "--batch-timeout-s", str(batch_timeout_s)],
                   log_path, env={**os.environ, **(env or {})})


class PeerClient:
    """One keep-alive connection to the peer's /predict; every reply is checked."""

    def __init__(self, port: int, timeout: float = 300.0):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def send(self, body: bytes) -> tuple[float, None]:
        started = time.perf_counter()
        self.connection.request("POST", "/predict", body, {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        data = response.read()
        elapsed = time.perf_counter() - started
        if response.status != 200 or b'"image"' not in data:
            raise RuntimeError(f"LitServe answered {response.status}: {data[:300]!r}")
        return elapsed, None

    def close(self) -> None:
        self.connection.close()


# --- The comparison. -------------------------------------------------------------------------

@contextlib.contextmanager
def paused(group: int):
    """Freeze every process of ``group`` (SIGSTOP) for the block; always resumed after it.

    Each stack is measured with the other frozen, as it would run alone on the machine. Left
    running, an idle stack still takes CPU from the one measured: measured on our 2-core
    machines, an idle LitServe server polls its queues at about 17 % of a core, our idle
    TorchServe (frontend, worker, engine process, deep checks) at about 1 %. Both still pay
    their own idle costs while they serve.
    """
    os.killpg(group, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(group, signal.SIGCONT)


def pair_ratios(ours: list[list[float]], theirs: list[list[float]]) -> list[float]:
    """median(ours block k) / median(theirs block k), for each pair of blocks.

    Block k of each stack was measured in the same moment of the machine (A B, B A, ...),
    so a drift of the machine that moves both blocks of a pair cancels in its ratio.

    Example:
        >>> pair_ratios([[1.0, 3.0], [4.0]], [[2.0], [2.0, 6.0]])
        [1.0, 1.0]
    """
    return [statistics.median(a) / statistics.median(b) for a, b in zip(ours, theirs)]


# Two-sided significance of the sign test below. Fewer than 6 pairs can never reach it:
# all 5 the same way is p = 2 / 2**5 = 0.0625.
SIGNIFICANCE = 0.05


def verdict(ratios: list[float], lower_is_better: bool) -> str:
    """Which stack is ahead, by an exact two-sided sign test over the pairs' ratios, or that
    the difference is within the machine's noise.

    A sign test asks only which stack won each pair, not by how much: one pair spoiled by
    the machine (a block at 0.8x) counts as one vote, not as a lead. It assumes nothing
    about how the timings are spread, which on a shared virtual machine nobody knows.

    Example:
        >>> verdict([0.98] * 9 + [1.01], lower_is_better=True)
        'ours ahead (9 of 10 pairs, p = 0.021)'
        >>> verdict([0.98] * 7 + [1.01] * 3, lower_is_better=True)
        'within noise (7 of 10 pairs ours, p = 0.34)'
    """
    votes = [r for r in ratios if r != 1.0]
    n = len(votes)
    ours = sum(1 for r in votes if (r < 1.0) == lower_is_better)
    fewer = min(ours, n - ours)
    p = min(1.0, 2 * sum(math.comb(n, k) for k in range(fewer + 1)) / 2 ** n) if n else 1.0
    if p >= SIGNIFICANCE:
        if 2 / 2 ** n >= SIGNIFICANCE:  # not even a unanimous vote could reach it
            return f"too few pairs to judge ({n})"
        return f"within noise ({ours} of {n} pairs ours, p = {p:.2g})"
    winner, won = ("ours", ours) if ours > n - ours else ("LitServe", n - ours)
    return f"{winner} ahead ({won} of {n} pairs, p = {p:.2g})"


def _throughput(send_factory: Callable[[], object], bodies: list[bytes], clients: int) -> float:
    """Requests per second from ``clients`` concurrent keep-alive connections."""
    import threading

    shares = [bodies[k::clients] for k in range(clients)]
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)

    def client(share):
        connection = send_factory()
        try:
            barrier.wait()
            for body in share:
                connection.send(body)
        except Exception as exc:  # noqa: BLE001 - the run fails below
            errors.append(f"{type(exc).__name__}: {exc}")
            barrier.abort()
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(s,), daemon=True) for s in shares]
    for thread in threads:
        thread.start()
    barrier.wait(timeout=120)
    started = time.perf_counter()
    for thread in threads:
        thread.join(600)
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"a client failed: {errors[:3]}")
    return len(bodies) / wall


def round_shares(count: int, rounds: int) -> list[range]:
    """Which of ``count`` blocks (or runs) each of ``rounds`` rounds measures: in order, as
    even as can be.

    Example:
        >>> [list(share) for share in round_shares(5, 2)]
        [[0, 1], [2, 3, 4]]
    """
    return [range(k * count // rounds, (k + 1) * count // rounds) for k in range(rounds)]


def measure_peers(plan, ours: Callable[[], object], our_group: int,
                  fresh_ours: Callable[[], int], model_dir: Path, config: dict,
                  batch_size: int, batch_delay_ms: int, free_port: Callable[[], int],
                  out: Path, log: Callable[[str], None],
                  env: dict[str, str] | None = None) -> dict:
    """Lone-request latency, 8-client throughput and compute-bound latency, ours and the
    peer's, interleaved so both see the same moments of the machine, each measured while
    the other is frozen (``paused``), in ``plan.peer_rounds`` rounds, each with fresh
    processes on both sides.

    Why rounds: two identical processes serving the same requests are not equally fast,
    and which one leads holds for many blocks in a row (measured on our 2-core build
    machine, docs/benchmarks.md: six pairs of fresh in-process services, medians 0.89x to
    1.05x of each other over 8 blocks, consecutive blocks' ratios correlated at 0.33). With
    one pair of processes for the whole comparison, every pair of blocks judged those two
    processes as much as the two stacks. Each round starts our model's worker (and so its
    engine process) and LitServe's server afresh, so the pairs of blocks come from several
    pairs of processes, and each round's own ratios are reported.

    Args:
        plan: bench.Plan (light and compute workloads, runs, counts, rounds).
        ours: makes a keep-alive client of our TorchServe model (``send(body)``, ``close()``)
            whose batchSize and maxBatchDelay are ``batch_size`` and ``batch_delay_ms``.
        our_group: the process group of our TorchServe (frontend, workers, engines).
        fresh_ours: replaces our model's worker with a new one and returns its pid once it
            is READY.
        env: added to LitServe's environment, as TorchServe's worker has it (threads).
    """
    rounds = plan.peer_rounds
    light_blocks, compute_blocks = 6, 2
    light: dict[str, list[list[float]]] = {"torchserve": [], "litserve": []}
    compute: dict[str, list[list[float]]] = {"torchserve": [], "litserve": []}
    rates: dict[str, list[float]] = {"torchserve": [], "litserve": []}
    per_round: list[dict[str, float]] = []
    processes: list[dict[str, int]] = []
    bodies = [json.dumps(plan.light.body(i)).encode()
              for i in range(plan.sweep_clients * plan.sweep_requests_per_client)]

    def lone(workload, count: int, block: int, blocks: range, paths: dict, others: dict,
             times: dict[str, list[list[float]]]) -> None:
        """One request at a time, ``block`` requests on one stack while the other is frozen,
        then the other stack, the order swapped each block (A B, B A, ...). A stack just
        resumed spends its first moments catching up (measured: about 20 ms more on our
        first request, whose frontend, worker and engine were all frozen), so each block
        starts with an untimed request on a fresh connection."""
        for number in blocks:
            start = number * block
            order = list(paths) if number % 2 == 0 else list(paths)[::-1]
            for name in order:
                with paused(others[name]):
                    client = paths[name]()
                    times[name].append([])
                    try:
                        client.send(json.dumps(workload.body(start + count)).encode())
                        for index in range(start, min(start + block, count)):
                            body = json.dumps(workload.body(index)).encode()
                            times[name][-1].append(client.send(body)[0])
                    finally:
                        client.close()

    light_shares = round_shares(math.ceil(plan.peer_lone_requests / light_blocks), rounds)
    compute_shares = round_shares(math.ceil(plan.peer_compute_requests / compute_blocks),
                                  rounds)
    run_shares = round_shares(plan.peer_throughput_runs, rounds)
    for number in range(rounds):
        log(f"peers round {number + 1}/{rounds}: a fresh worker of ours, a fresh LitServe "
            f"(max_batch_size {batch_size}, batch_timeout {batch_delay_ms} ms)")
        worker = fresh_ours()
        port = free_port()
        peer = peer_process(port, model_dir, config, batch_size, batch_delay_ms / 1000,
                            out / f"litserve-{number + 1}.log", env)
        paths = {"torchserve": ours, "litserve": lambda: PeerClient(port)}
        marks = {name: (len(light[name]), len(compute[name]), len(rates[name]))
                 for name in paths}
        try:
            peer.start()
            wait_http(f"http://127.0.0.1:{port}/health", 180, peer)
            processes.append({"torchserve_worker": worker, "litserve": peer.pid})
            others = {"torchserve": peer.pid, "litserve": our_group}
            lone(plan.light, plan.peer_lone_requests, light_blocks, light_shares[number],
                 paths, others, light)
            lone(plan.compute, plan.peer_compute_requests, compute_blocks,
                 compute_shares[number], paths, others, compute)
            for run in run_shares[number]:
                order = list(paths) if run % 2 == 0 else list(paths)[::-1]
                for name in order:
                    with paused(others[name]):
                        rates[name].append(_throughput(paths[name], bodies,
                                                       plan.sweep_clients))
                    log(f"peers run {run + 1}/{plan.peer_throughput_runs} {name:<10} "
                        f"{rates[name][-1]:6.2f} req/s at {plan.sweep_clients} clients")
        finally:
            peer.stop()
        # This round's pair of processes on its own: ratios of its medians.
        mine = {name: (flat(light[name][marks[name][0]:]),
                       flat(compute[name][marks[name][1]:]), rates[name][marks[name][2]:])
                for name in paths}
        ts, lit = mine["torchserve"], mine["litserve"]
        per_round.append({key: statistics.median(a) / statistics.median(b)
                          for key, a, b in zip(("lone_p50", "compute_p50",
                                                "clients_throughput"), ts, lit) if a and b})

    def summary(name: str) -> dict:
        return {"lone_p50_ms": statistics.median(flat(light[name])) * 1000,
                "lone_p95_ms": percentile(flat(light[name]), 95) * 1000,
                "clients_throughput_rps": statistics.median(rates[name]),
                "compute_p50_ms": statistics.median(flat(compute[name])) * 1000}

    result = {name: summary(name) for name in light}
    ts, lit = result["torchserve"], result["litserve"]
    result["settings"] = {"batch_size": batch_size, "batch_delay_ms": batch_delay_ms,
                          "clients": plan.sweep_clients, "runs": plan.peer_throughput_runs,
                          "rounds": rounds, "other_stack": "paused"}
    result["ratios"] = {
        "lone_p50": ts["lone_p50_ms"] / lit["lone_p50_ms"],
        "clients_throughput": ts["clients_throughput_rps"] / lit["clients_throughput_rps"],
        "compute_p50": ts["compute_p50_ms"] / lit["compute_p50_ms"],
    }
    # Whether the machine's noise alone could have made a ratio: each pair of blocks (of
    # throughput runs) measured in the same moment is one vote.
    ratios = {"lone_p50": pair_ratios(light["torchserve"], light["litserve"]),
              "clients_throughput": [a / b for a, b in zip(rates["torchserve"],
                                                           rates["litserve"])],
              "compute_p50": pair_ratios(compute["torchserve"], compute["litserve"])}
    result["pair_ratios"] = ratios
    result["verdicts"] = {key: verdict(value, key != "clients_throughput")
                          for key, value in ratios.items()}
    result["round_ratios"] = per_round
    result["round_processes"] = processes
    # Every timed request, block by block, so any other statistic can be taken later.
    result["samples"] = {
        "lone_ms": {name: [[t * 1000 for t in b] for b in light[name]] for name in light},
        "compute_ms": {name: [[t * 1000 for t in b] for b in compute[name]]
                       for name in light},
        "clients_rps": rates}
    return result


def flat(blocks: list[list[float]]) -> list[float]:
    return [t for b in blocks for t in b]


# --- Two identical processes: what "within noise" means on this machine. ----------------

def identical_worker(model_dir: str, workload: dict) -> None:
    """One of the two processes of ``identical``: our core in process, warmed. For each
    line ``start count`` on stdin it runs an untimed request, then ``count`` timed ones
    (seeds from ``start``), and prints their times in seconds as one JSON line."""
    from sdxl_serve.engine import load_engine
    from sdxl_serve.service import GenerationService, Incoming
    from sdxl_serve.settings import Settings

    engine = load_engine(model_dir, Settings.from_mapping({}))
    engine.warm_up()
    service = GenerationService(engine, "1.0")
    print("ready", flush=True)
    for line in sys.stdin:
        start, count = map(int, line.split())
        times = []
        for seed in range(start, start + count + 1):
            began = time.perf_counter()
            service.handle([Incoming({**workload, "seed": seed})])
            times.append(time.perf_counter() - began)
        print(json.dumps(times[1:]), flush=True)


def measure_identical(model_dir: Path, workload: dict, pairs: int, blocks: int, block: int,
                      log: Callable[[str], None]) -> list[dict]:
    """``pairs`` times, two fresh identical processes take turns (A B, B A, ...) for
    ``blocks`` blocks of ``block`` requests each; the other waits on its stdin, idle. Returns
    per pair its block medians (ms), the ratios A / B and their median: what the
    side-by-side comparison would report if both stacks were the same one."""
    import subprocess

    records = []
    for pair in range(pairs):
        processes = [subprocess.Popen(
            [sys.executable, __file__, "identical-worker", "--model-dir", str(model_dir),
             "--workload", json.dumps(workload)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in "AB"]
        try:
            for process in processes:
                if process.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"an identical worker exited with {process.wait()}")
            medians: list[list[float]] = [[], []]
            for number in range(blocks):
                for k in ((0, 1) if number % 2 == 0 else (1, 0)):
                    processes[k].stdin.write(f"{1000 + number * block} {block}\n")
                    processes[k].stdin.flush()
                    times = json.loads(processes[k].stdout.readline())
                    medians[k].append(statistics.median(times) * 1000)
        finally:
            for process in processes:
                process.kill()
                process.wait()
        ratios = pair_ratios([[m] for m in medians[0]], [[m] for m in medians[1]])
        records.append({"a_ms": medians[0], "b_ms": medians[1], "ratios": ratios,
                        "median_ratio": statistics.median(ratios),
                        "a_faster": sum(1 for r in ratios if r < 1.0)})
        log(f"pair {pair + 1}/{pairs}: A / B {records[-1]['median_ratio']:.3f} (A faster in "
            f"{records[-1]['a_faster']} of {blocks} blocks, blocks "
            f"{min(ratios):.2f}-{max(ratios):.2f}): {verdict(ratios, True)}")
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("serve", help="run the LitServe peer server in the foreground")
    run.add_argument("--port", type=int, required=True)
    run.add_argument("--model-dir", required=True)
    run.add_argument("--config", default="{}", help="handler settings as JSON")
    run.add_argument("--max-batch-size", type=int, default=4)
    run.add_argument("--batch-timeout-s", type=float, default=0.005)
    same = sub.add_parser("identical", help="two identical processes of our core side by "
                          "side, as the comparison measures stacks: the noise floor")
    same.add_argument("--pairs", type=int, default=6, help="pairs of fresh processes")
    same.add_argument("--blocks", type=int, default=8, help="blocks per process and pair")
    same.add_argument("--block", type=int, default=6, help="timed requests per block")
    same.add_argument("--workload", choices=("light", "compute"), default="light")
    same.add_argument("--model-dir", help="default: the tiny model, built if missing")
    worker = sub.add_parser("identical-worker", help=argparse.SUPPRESS)
    worker.add_argument("--model-dir", required=True)
    worker.add_argument("--workload", required=True)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.port, args.model_dir, json.loads(args.config), args.max_batch_size,
              args.batch_timeout_s)
    elif args.command == "identical-worker":
        identical_worker(args.model_dir, json.loads(args.workload))
    else:
        from bench import COMPUTE, LIGHT
        from build_model import ensure_tiny_model

        workload = (LIGHT if args.workload == "light" else COMPUTE).body(0)
        workload.pop("seed")
        model_dir = Path(args.model_dir) if args.model_dir else ensure_tiny_model()
        records = measure_identical(model_dir, workload, args.pairs, args.blocks, args.block,
                                    lambda line: print(line, file=sys.stderr, flush=True))
        print(json.dumps({"workload": workload, "block": args.block, "pairs": records}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
