"""TorchServe's log files stay within the pod's run volume (config/log4j2.xml;
docs/operations.md, "Logs").

The pod writes its logs to an emptyDir with a sizeLimit, and Kubernetes evicts a pod whose
emptyDir outgrows it. The first test redoes the worst-case sum from the log configuration
and the Deployment; the second runs a real TorchServe with the shipped configuration, its
sizes scaled down, until its logs have rolled many times, and reads what was kept. The
third holds torchserve.out, where `make serve` puts TorchServe's console, to no line per call.
"""

from __future__ import annotations

import fnmatch
import gzip
import http.client
import re
import urllib.parse
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from sdxl_serve.server import Addresses, ServerError, TorchServeProcess

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
LOG_CONFIG = REPO / "config" / "log4j2.xml"
DEPLOYMENT = REPO / "k8s" / "base" / "deployment.yaml"
# The share of the volume the worst case may take. The rest is for key_file.json, the line or
# two each live file gets beyond its size (log4j checks the size before it writes a line) and
# the few bytes gzip adds to an input it cannot compress.
SHARE_OF_VOLUME = 0.8
ENV_LOOKUP = re.compile(r"\$\{env:(\w+):-[^}]*\}")


def file_size(text: str) -> int:
    """Bytes in a log4j size ("32 MB", "2048"): its KB, MB and GB are binary (FileSize)."""
    number, unit = re.fullmatch(r"\s*([0-9]+)\s*([KMG]?)B?\s*", text, re.IGNORECASE).groups()
    return int(number) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[unit.upper()]


def quantity(text: str) -> int:
    """Bytes in a Kubernetes quantity ("1Gi", "500M")."""
    number, unit = re.fullmatch(r"([0-9]+)([KMGT]i?|k)?", str(text)).groups()
    powers = {None: 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
              "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return int(number) * powers[unit]


@dataclass(frozen=True)
class Appender:
    """What one RollingFile writes and keeps."""

    name: str
    file_name: str
    file_pattern: str
    size: int
    """The live file's size at which it rolls."""
    delete_base: str | None
    delete_depth: str | None
    glob: str | None
    """The names its Delete action looks at."""
    exceeds: int | None
    """What its archives may take together (IfAccumulatedFileSize); None: no bound."""

    @property
    def worst_case(self) -> int:
        """Its live file, the file being compressed with its gzip beside it, its archives."""
        return 3 * self.size + self.exceeds

    def archive_name(self, day: str = "2026-12-01", index: int = 7) -> str:
        name = self.file_pattern.rsplit("/", 1)[1]
        return re.sub(r"%d\{[^}]*\}", day, name).replace("%i", str(index))

    def archives(self, directory: Path) -> list[Path]:
        """Its archives in ``directory``: what its Delete looks at (without one, what its
        file pattern names)."""
        glob = self.glob or re.sub(r"%d\{[^}]*\}|%i", "*", self.file_pattern.rsplit("/", 1)[1])
        return [path for path in directory.iterdir() if fnmatch.fnmatchcase(path.name, glob)]


def appenders(text: str) -> list[Appender]:
    found = []
    for element in ElementTree.fromstring(text).iter("RollingFile"):
        [size] = element.iter("SizeBasedTriggeringPolicy")
        delete = element.find("DefaultRolloverStrategy/Delete")
        by_name = delete.find("IfFileName") if delete is not None else None
        bound = by_name.find("IfAccumulatedFileSize") if by_name is not None else None
        found.append(Appender(
            element.get("name"), element.get("fileName"), element.get("filePattern"),
            file_size(size.get("size")),
            delete.get("basePath") if delete is not None else None,
            delete.get("maxDepth") if delete is not None else None,
            by_name.get("glob") if by_name is not None else None,
            file_size(bound.get("exceeds")) if bound is not None else None))
    return found


def run_volume_limit(variables: set[str]) -> tuple[str, int]:
    """(name, sizeLimit in bytes) of the Deployment's volume that holds the directories the
    TorchServe container's ``variables`` name; all must be on one emptyDir."""
    pod = yaml.safe_load(DEPLOYMENT.read_text())["spec"]["template"]["spec"]
    [container] = [c for c in pod["containers"] if c["name"] == "torchserve"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    volumes = set()
    for variable in variables:
        directory = env[variable]
        mounts = [m for m in container["volumeMounts"]
                  if (directory + "/").startswith(m["mountPath"].rstrip("/") + "/")]
        volumes.add(max(mounts, key=lambda m: len(m["mountPath"]))["name"])
    [volume] = volumes
    [spec] = [v for v in pod["volumes"] if v["name"] == volume]
    return volume, quantity(spec["emptyDir"]["sizeLimit"])


def test_the_logs_fit_the_run_volume_in_the_worst_case():
    rolling = appenders(LOG_CONFIG.read_text())
    assert {a.name for a in rolling} == {"access_log", "model_log", "model_metrics", "ts_log",
                                         "ts_metrics"}
    for appender in rolling:
        # Every rollover gets a name of its own: with no %i, a second rollover in one day
        # overwrote the first's archive, and `max` (which counts indexes) bounded nothing.
        assert "%i" in appender.file_pattern and "%d{yyyy-MM-dd}" in appender.file_pattern, \
            f"{appender.name}: {appender.file_pattern} reuses names (no %i or no sortable date)"
        assert appender.exceeds is not None, \
            f"{appender.name}: no Delete with IfFileName/IfAccumulatedFileSize bounds its archives"
        # The Delete looks in the appender's own directory, and only at its own archives
        # (an uncompressed one left by a stop during compression included), never at a live
        # file or another appender's archive.
        assert appender.delete_base == appender.file_name.rsplit("/", 1)[0], appender.name
        assert appender.delete_depth == "1", appender.name
        archive = appender.archive_name()
        assert fnmatch.fnmatchcase(archive, appender.glob), (appender.name, archive)
        assert fnmatch.fnmatchcase(archive.removesuffix(".gz"), appender.glob), appender.name
        for other in rolling:
            assert not fnmatch.fnmatchcase(other.file_name.rsplit("/", 1)[1], appender.glob)
            if other is not appender:
                assert not fnmatch.fnmatchcase(other.archive_name(), appender.glob)

    variables = {ENV_LOOKUP.match(a.file_name).group(1) for a in rolling}
    volume, limit = run_volume_limit(variables)
    worst = sum(a.worst_case for a in rolling)
    assert worst <= SHARE_OF_VOLUME * limit, (
        f"the logs may take {worst / 2**20:.0f} MiB, more than {SHARE_OF_VOLUME:.0%} of the "
        f"{volume} volume's {limit / 2**20:.0f} MiB: "
        + ", ".join(f"{a.name} {a.worst_case / 2**20:.0f}" for a in rolling))


# --- A real TorchServe with the shipped file, its sizes scaled down. --------------------------

# 32 MB becomes 2 KiB: a few hundred calls roll each log it writes a hundred times.
SCALE = 2**14
PINGS = 3000
# A live file may pass its size by the lines written while log4j checked it (a few, from
# the server's several threads); at this scale that is not nothing.
SLACK = 1024
PING = re.compile(rb"GET /ping\?n=(\d+) ")
# What a server without a model writes at every call (the others need a worker; their
# configuration is the same but for the sizes, which the first test checks).
WRITTEN = ("access_log", "ts_log")


def scaled(text: str, scale: int) -> str:
    """``text`` with every size divided by ``scale``, and nothing else changed."""
    sizes = re.compile(r'\b(size|exceeds)="([^"]*)"')
    assert len(sizes.findall(text)) >= 5
    return sizes.sub(lambda m: f'{m[1]}="{file_size(m[2]) // scale}"', text)


def archive_order(path: Path) -> tuple:
    """Oldest first: by the date, then the index in the name."""
    return tuple(int(part) if part.isdigit() else part for part in path.name.split("."))


def pings_in(paths: list[Path]) -> list[int]:
    """The ping numbers these files hold, in the order they hold them."""
    found = []
    for path in paths:
        data = path.read_bytes()
        found += [int(n) for n in PING.findall(gzip.decompress(data) if path.suffix == ".gz"
                                               else data)]
    return found


def test_a_real_server_rolls_its_logs_many_times_and_keeps_the_newest_within_the_bound(
        tmp_path):
    """Numbered pings (the number in the query string, which both logs write) fill
    access_log and ts_log."""
    config = tmp_path / "log4j2.xml"
    config.write_text(scaled(LOG_CONFIG.read_text(), SCALE))
    rolling = {a.name: a for a in appenders(config.read_text())}
    (tmp_path / "store").mkdir()
    server = TorchServeProcess(tmp_path / "run", tmp_path / "store", {}, Addresses.free(),
                               log_config=config)
    logs = server.run_dir / "logs"

    def within_bound(n: int) -> None:
        if n % 500 == 499:  # the bound holds while the server writes, not only after
            for name in WRITTEN:
                appender = rolling[name]
                taken = sum(size_of(p) for p in appender.archives(logs))
                taken += size_of(logs / f"{name}.log")
                assert appender.exceeds is None or \
                    taken <= appender.worst_case + SLACK, (name, taken)

    ping_numbered(server, PINGS, within_bound)

    for name in WRITTEN:
        appender = rolling[name]
        archives = sorted(appender.archives(logs), key=archive_order)
        kept = pings_in([*archives, logs / f"{name}.log"])
        # Every rollover kept its own archive, and only the oldest went: the pings kept are
        # the newest, without a gap (an overwritten archive leaves one).
        assert len(archives) >= 2, (
            f"{name}: {len(archives)} archive(s) kept of the many rollovers {PINGS} pings "
            f"made, {[p.name for p in archives]}: a rollover overwrote the one before")
        assert kept and kept == list(range(kept[0], PINGS)), \
            f"{name}: the pings kept are not the newest without a gap: {kept[:3]}..{kept[-3:]}"
        assert appender.exceeds is not None, f"{name}: nothing bounds its archives"
        assert sum(p.stat().st_size for p in archives) <= appender.exceeds, name
        # And the bound was reached: it rolled more often than it kept archives.
        assert kept[0] > 0 and len(archives) < rollovers(archives), (name, kept[0])


def ping_numbered(server: TorchServeProcess, count: int,
                  after_each: Callable[[int], None] = lambda n: None) -> None:
    """Start ``server`` (no model), send it ``count`` numbered pings on one connection,
    each answered 200, call ``after_each(n)`` after ping ``n``, and stop it (Java included,
    whatever happened)."""
    server.start()
    try:
        server.wait_ready(None, timeout=120)
        inference = urllib.parse.urlsplit(server.addresses.inference)
        connection = http.client.HTTPConnection(inference.hostname, inference.port, timeout=30)
        authorization = {"Authorization": f"Bearer {server.keys()['inference']}"}
        for n in range(count):
            connection.request("GET", f"/ping?n={n}", headers=authorization)
            with connection.getresponse() as response:
                response.read()
                assert response.status == 200
            after_each(n)
        connection.close()
    finally:
        server.stop()


def rollovers(archives: list[Path]) -> int:
    """How many times a log rolled, from its archives' names: each day's indexes count up
    from 1 and the newest archive is never deleted."""
    newest: dict[str, int] = {}
    for path in archives:
        day, index = path.name.split(".")[1:3]
        newest[day] = max(newest.get(day, 0), int(index))
    return sum(newest.values())


def size_of(path: Path) -> int:
    """Its size; 0 once gone (a rollover renames and deletes files as we look)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# --- A normal start. ------------------------------------------------------------------------

def test_a_normal_start_writes_no_warning_to_the_model_log(server):
    """A worker's start up to its engine's READY writes no WARN line to model_log.log: the
    libraries' notes about themselves as the engines' fork server imported them (torchao,
    torch, diffusers, transformers) were seven WARN lines at each worker start, which a log
    pipeline that alerts on WARN had to learn by their words (docs/operations.md)."""
    lines = (server.run_dir / "logs" / "model_log.log").read_text(errors="replace").splitlines()
    ready = next(index for index, line in enumerate(lines)
                 if "MODEL_LOG - engine process " in line and " ready in " in line)
    assert [line for line in lines[:ready] if "[WARN " in line or "[ERROR" in line] == []
    # Nor any of TorchServe's own up to then: its metrics sampler said "worker pid is not
    # available yet." at WARN before the worker had started. (torchserve.out keeps WARN and
    # above, and Java's own unlevelled lines, which are not the server's log lines.)
    ready_at = lines[ready].split(" ", 1)[0]
    console = server.log_path.read_text(errors="replace").splitlines()
    assert [line for line in console if line[:4].isdigit() and line.split(" ", 1)[0] <= ready_at
            and ("[WARN " in line or "[ERROR" in line)] == [], console


# --- torchserve.out, which no appender rolls. ------------------------------------------------

CALLS = 200


def test_torchserve_out_gets_no_line_per_call(tmp_path):
    """`make serve` (and `make serve-jobs`, the tests) write TorchServe's console to
    torchserve.out in the run directory, which nothing rolls or deletes. The console got
    every line ts_log.log gets, so it grew by about a kilobyte a request for as long as the
    server ran: 457,655 bytes in a 12-minute soak of `make serve-jobs`, byte for byte what
    ts_log.log grew, which rolls. Numbered pings are logged at INFO like every request."""
    (tmp_path / "store").mkdir()
    server = TorchServeProcess(tmp_path / "run", tmp_path / "store", {}, Addresses.free())
    ping_numbered(server, CALLS)
    # The calls were logged (the check below proves something), where they roll.
    assert pings_in([server.run_dir / "logs" / "ts_log.log"]) == list(range(CALLS))
    assert pings_in([server.log_path]) == [], \
        f"torchserve.out ({size_of(server.log_path)} bytes) holds a line per call"


def test_a_start_that_fails_shows_the_frontends_own_lines(tmp_path):
    """torchserve.out holds warnings and errors only, so the lines a failed start is read
    from (what the frontend was doing: here, answering 404 for the model waited for) come
    from ts_log.log; and from this start's alone, though every file appends across the
    starts of one run directory."""
    (tmp_path / "store").mkdir()
    server = TorchServeProcess(tmp_path / "run", tmp_path / "store", {}, Addresses.free())
    failures = []
    for model in ("registered-by-nobody", "never-registered"):
        server.start()
        try:
            server.wait_ready(None, timeout=120)
            with pytest.raises(ServerError) as failed:
                server.wait_ready(model, timeout=1)
            failures.append(str(failed.value))
        finally:
            server.stop()
    assert '"GET /models/never-registered HTTP/1.1" 404' in failures[1], failures[1]
    assert "registered-by-nobody" not in failures[1], failures[1]
    assert str(server.run_dir / "logs") in failures[1]
