"""The keda-jobs overlay: the job API, its Redis and the dispatcher sidecar, scaled by KEDA.

Every overlay is rendered and validated in test_manifests.py; here is what must agree
between this overlay and the job API's code: the sidecar's command line (parsed by the
dispatcher's own parser), the API's probes (asked of a real API process over a real Redis),
the stream KEDA counts (the store's own names), Redis's start script and configuration (run
with the local redis-server), the password placeholder, the network paths and the alerts'
thresholds. No cluster runs here: whether KEDA, the CNI and the kubelet do what these
objects ask is not tested (docs/jobs-kubernetes.md).
"""

from __future__ import annotations

import inspect
import json
import re
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from sdxl_jobs import api as jobs_api
from sdxl_jobs import dispatcher as jobs_dispatcher
from sdxl_jobs import webhooks as webhooks_module
from sdxl_jobs.processes import Managed, api_process, free_port, wait_http
from sdxl_jobs.settings import JobSettings
from sdxl_jobs.store import GROUP, JobStore
from sdxl_serve.cancellation import cancel_flag
from sdxl_serve.settings import Settings
# Helpers of the render and validate tests beside this file (pytest puts it on the path).
from test_manifests import (MODEL_CONFIG, OVERLAYS, REFERENCE_BEHAVIOR, REPO,
                            one, parsed_command_line, pod_spec, rendered, server_container)
from lifetimes import killed_mid_rewrite, wait_until

pytestmark = pytest.mark.k8s

OVERLAY = "keda-jobs"
# The store's stream, as KEDA must name it: the default key prefix, then "stream".
STREAM = inspect.signature(JobStore.__init__).parameters["prefix"].default + "stream"
# Labels the overlay's workloads carry, by role.
NAME = {"app.kubernetes.io/name": "sdxl-serve"}
SERVER = {**NAME, "app.kubernetes.io/component": "server"}
API = {**NAME, "app.kubernetes.io/component": "jobs-api"}
REDIS = {**NAME, "app.kubernetes.io/component": "redis"}
# A GPU node in the cloud takes 2-5 minutes to come up (the reference's figure).
GPU_NODE_S = 300
# The variable naming the cancel directory, by container: each package's own prefix.
CANCEL_DIR = {"dispatcher": "SDXL_JOBS_CANCEL_DIR", "torchserve": "SDXL_CANCEL_DIR"}


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return rendered(OVERLAY)


def container(docs: list[dict], name: str) -> dict:
    """A container of the overlay's workloads, by name."""
    found = [c for doc in docs if doc["kind"] in ("Deployment", "StatefulSet")
             for c in doc["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    assert len(found) == 1, f"expected one container {name}, found {len(found)}"
    return found[0]


def secret_ref(item: dict) -> tuple[str, str]:
    ref = item["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def env_of(container_: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container_.get("env", [])}


def secret_values(docs: list[dict]) -> dict[str, str]:
    return one(docs, "Secret", "sdxl-jobs-redis")["stringData"]


def redis_conf(docs: list[dict]) -> str:
    maps = [doc for doc in docs if doc["kind"] == "ConfigMap"
            and doc["metadata"]["name"].startswith("sdxl-redis-config")]
    assert len(maps) == 1
    return maps[0]["data"]["redis.conf"]


def conf_values(text: str) -> dict[str, str]:
    """redis.conf's directives (the last one wins, as in Redis)."""
    values = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.strip().partition(" ")
            values[name] = value.strip()
    return values


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# --- the objects -------------------------------------------------------------------------

def test_the_overlay_deploys_the_job_stack(docs):
    names = {(doc["kind"], doc["metadata"]["name"]) for doc in docs}
    assert {("Deployment", "sdxl-serve"), ("Deployment", "sdxl-jobs-api"),
            ("Service", "sdxl-jobs-api"), ("PodDisruptionBudget", "sdxl-jobs-api"),
            ("NetworkPolicy", "sdxl-jobs-api"), ("StatefulSet", "sdxl-redis"),
            ("Service", "sdxl-redis"), ("NetworkPolicy", "sdxl-redis"),
            ("Secret", "sdxl-jobs-redis"), ("ScaledObject", "sdxl-serve"),
            ("TriggerAuthentication", "sdxl-jobs-redis"), ("PodMonitor", "sdxl-jobs-api"),
            ("PrometheusRule", "sdxl-jobs")} <= names
    assert not [doc for doc in docs if doc["kind"] == "HorizontalPodAutoscaler"], \
        "KEDA owns the HPA; a second one would fight it"
    # Every workload is in the overlay's namespace (KEDA's address below names it).
    assert {doc["metadata"].get("namespace") for doc in docs
            if doc["kind"] != "Namespace"} == {"sdxl-serve"}


# --- the dispatcher sidecar --------------------------------------------------------------

def test_the_dispatcher_calls_its_own_torchserve_with_its_key(docs):
    spec = pod_spec(docs)
    server = server_container(docs)
    sidecar = next(c for c in spec["containers"] if c["name"] == "dispatcher")
    assert sidecar["image"] == server["image"]
    assert sidecar["command"] == ["python", "-m", "sdxl_jobs.dispatcher"]
    args = parsed_command_line(jobs_dispatcher.main, sidecar["args"])
    server_env = {item["name"]: item.get("value") for item in server["env"]}
    ports = {port["name"]: port["containerPort"] for port in server["ports"]}
    # TorchServe on the pod's loopback: inference on its port, management where it listens.
    assert args.torchserve == f"http://127.0.0.1:{ports['inference']}"
    assert args.management == server_env["TS_MANAGEMENT_ADDRESS"]
    # The model TorchServe serves (--models name=archive).
    models = server["args"][server["args"].index("--models") + 1:]
    assert args.model in {model.split("=")[0] for model in models}
    # The key file TorchServe writes to its run directory, through the same volume, read-only.
    run_dir = server_env["SDXL_RUN_DIR"]
    assert args.key_file == f"{run_dir}/key_file.json"
    server_mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    (mount,) = [m for m in sidecar["volumeMounts"] if m["mountPath"] == run_dir]
    assert mount["name"] == server_mounts[run_dir] and mount["readOnly"] is True
    # It writes only its cancel flags (test_canceling_...).
    assert [m["name"] for m in sidecar["volumeMounts"] if not m.get("readOnly")] == ["cancel"]
    # Redis from the Secret, and nothing but the cancel directory overriding the job
    # settings' defaults.
    env = env_of(sidecar)
    assert secret_ref(env["SDXL_REDIS_URL"]) == ("sdxl-jobs-redis", "url")
    assert [name for name in env if name.startswith("SDXL_JOBS_")] == [CANCEL_DIR["dispatcher"]]


def test_the_dispatcher_is_a_small_hardened_container(docs):
    sidecar = container(docs, "dispatcher")
    assert sidecar["securityContext"] == server_container(docs)["securityContext"]
    requests, limits = sidecar["resources"]["requests"], sidecar["resources"]["limits"]
    assert "nvidia.com/gpu" not in requests and "nvidia.com/gpu" not in limits
    assert requests["cpu"].endswith("m") and int(requests["cpu"][:-1]) <= 250
    assert requests["memory"].endswith("Mi") and limits["memory"].endswith("Mi")
    # No port to probe: liveness is the process (it exits on a fatal error).
    assert "ports" not in sidecar and "livenessProbe" not in sidecar


def test_the_dispatcher_gets_sigterm_as_the_pod_starts_stopping(docs):
    spec = pod_spec(docs)
    sidecar = container(docs, "dispatcher")
    # SIGTERM reaches it at once (no preStop to wait for) and reaches python itself (its
    # PID 1: no shell in between). A native sidecar (an init container that restarts) would
    # be stopped only after TorchServe's drain, pulling jobs into a draining server.
    assert "lifecycle" not in sidecar
    assert sidecar["command"][0] == "python"
    assert "dispatcher" not in [c["name"] for c in spec.get("initContainers", [])]
    assert not spec.get("shareProcessNamespace")
    # The jobs it leaves are taken over elsewhere once their lease has run out; its own
    # pod lives on through TorchServe's drain, far longer than that.
    assert spec["terminationGracePeriodSeconds"] > JobSettings().lease_s


def test_canceling_reaches_the_worker_through_one_shared_volume(docs, tmp_path):
    # TorchServe never tells a worker that its client went away: a canceled job's generation
    # stops only on the flag file the dispatcher makes where the worker looks.
    spec = pod_spec(docs)
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    shared = {}
    for name, variable in CANCEL_DIR.items():
        container_ = container(docs, name)
        path = env_of(container_)[variable]["value"]
        (mount,) = [m for m in container_["volumeMounts"] if m["mountPath"] == path]
        # The dispatcher makes the flags; the worker deletes them after its batch.
        assert not mount.get("readOnly"), name
        assert container_["securityContext"]["readOnlyRootFilesystem"] is True, name
        shared[name] = mount["name"], path
    assert shared["dispatcher"] == shared["torchserve"]
    volume_name, path = shared["dispatcher"]
    # Lives and dies with the pod, as the calls the flags name; not the `run` volume, whose
    # key file stays read-only to the sidecar.
    assert set(volumes[volume_name]) == {"name", "emptyDir"} and volume_name != "run"

    # Each side's own settings read their container's environment, the volume standing in
    # a temp dir (both refuse a directory that does not exist): a flag the dispatcher makes
    # is the file the worker checks.
    here = tmp_path / "cancel"
    here.mkdir()

    def environment(name: str) -> dict[str, str]:
        return {item["name"]: item["value"].replace(path, str(here))
                for item in container(docs, name)["env"] if "value" in item}

    jobs = JobSettings.from_env(environment("dispatcher"))
    worker = Settings.from_mapping(MODEL_CONFIG["handler"], environment("torchserve"))
    token = uuid.uuid4().hex
    flag = cancel_flag(jobs.cancel_dir, token)
    assert flag and flag == cancel_flag(worker.cancel_dir, token)
    jobs_dispatcher.Dispatcher._stop_generation("job", flag)
    assert [p.name for p in here.iterdir()] == [token]


@pytest.mark.parametrize("overlay", ["base", *(o for o in OVERLAYS if o != OVERLAY)])
def test_no_cancel_directory_without_a_dispatcher(overlay):
    # Nothing makes flags there: a worker told to watch would watch for nothing.
    docs = rendered("../base" if overlay == "base" else overlay)
    spec = pod_spec(docs)
    assert [c["name"] for c in spec["containers"]] == ["torchserve"]
    env = env_of(server_container(docs))
    assert not set(CANCEL_DIR.values()) & set(env)
    assert "cancel" not in {volume["name"] for volume in spec["volumes"]}


# --- the job API -------------------------------------------------------------------------

def test_the_api_runs_on_cpu_with_the_redis_url_from_the_secret(docs):
    deployment = one(docs, "Deployment", "sdxl-jobs-api")
    spec = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 2
    assert matches(deployment["spec"]["selector"]["matchLabels"],
                   deployment["spec"]["template"]["metadata"]["labels"])
    (api,) = spec["containers"]
    assert api["command"] == ["python", "-m", "sdxl_jobs.api"]
    address = urllib.parse.urlsplit(parsed_command_line(jobs_api.main, api["args"]).address)
    ports = {port["name"]: port["containerPort"] for port in api["ports"]}
    assert address.hostname == "0.0.0.0" and address.port == ports["http"]
    assert secret_ref(env_of(api)["SDXL_REDIS_URL"]) == ("sdxl-jobs-redis", "url")
    resources = api["resources"]
    assert "nvidia.com/gpu" not in resources.get("limits", {})
    assert "tolerations" not in spec
    assert api["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False
    service = one(docs, "Service", "sdxl-jobs-api")["spec"]
    assert service["selector"] == API
    assert [(p["port"], p["targetPort"]) for p in service["ports"]] == [(8090, "http")]
    budget = one(docs, "PodDisruptionBudget", "sdxl-jobs-api")["spec"]
    assert budget["selector"]["matchLabels"] == API and budget["minAvailable"] == 1


def test_a_managed_redis_ca_reaches_the_api_and_the_dispatcher_where_the_url_names_it(docs):
    """A managed Redis's private CA (rediss:// with ?ssl_ca_certs=) had no way into the pods.
    The Secret's `ca.crt` is mounted in both, at the file the URL of docs/jobs-kubernetes.md
    names; that key alone (the password stays off the file system), and optional (the
    overlay's own Redis has no CA)."""
    text = (REPO / "docs" / "jobs-kubernetes.md").read_text()
    (named,) = set(re.findall(r"ssl_ca_certs=([^\s`\"&]+)", text))
    for name, spec in (("jobs-api", pod_spec(docs, "sdxl-jobs-api")),
                       ("dispatcher", pod_spec(docs))):
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        (mount,) = [m for m in container(docs, name)["volumeMounts"]
                    if named.startswith(m["mountPath"].rstrip("/") + "/")]
        assert mount["readOnly"] is True, name
        assert volumes[mount["name"]]["secret"] == {
            "secretName": secret_ref(env_of(container(docs, name))["SDXL_REDIS_URL"])[0],
            "optional": True,
            "items": [{"key": "ca.crt", "path": named[len(mount["mountPath"]) + 1:]}]}, name


def test_the_api_probes_do_not_need_a_dispatcher(docs):
    api = container(docs, "jobs-api")
    readiness = urllib.parse.urlsplit(api["readinessProbe"]["httpGet"]["path"])
    assert readiness.path == "/v1/health"
    # With the GPU pods at zero no dispatcher checks in: the API must stay ready to take
    # the job that scales them up.
    assert urllib.parse.parse_qs(readiness.query) == {"dispatchers": ["0"]}
    liveness = urllib.parse.urlsplit(api["livenessProbe"]["httpGet"]["path"])
    assert liveness.path != "/v1/health" or "dispatchers=0" in liveness.query


def test_the_api_answers_its_probe_and_scrape_before_they_give_up(docs):
    """/v1/health and /metrics wait PROBE_REDIS_S for Redis: a deadline at or past the
    readiness probe's timeout or the scrape's fails them with no reason, as the 30 s socket
    timeout did, instead of a 503 saying that Redis does not answer."""
    probe = container(docs, "jobs-api")["readinessProbe"]
    (scrape,) = one(docs, "PodMonitor", "sdxl-jobs-api")["spec"]["podMetricsEndpoints"]
    assert scrape["path"] == "/metrics" and scrape["scrapeTimeout"].endswith("s")
    # A second left for the HTTP exchange around the Redis calls.
    assert jobs_api.PROBE_REDIS_S <= probe["timeoutSeconds"] - 1
    assert jobs_api.PROBE_REDIS_S <= int(scrape["scrapeTimeout"][:-1]) - 1


# --- Redis -------------------------------------------------------------------------------

def test_redis_keeps_every_job_on_disk_and_never_evicts(docs):
    conf = conf_values(redis_conf(docs))
    assert conf["appendonly"] == "yes"
    # A submit is answered only once the job is fsynced, rewrite or not.
    assert conf["appendfsync"] == "always"
    assert conf["no-appendfsync-on-rewrite"] == "no"
    assert conf["maxmemory-policy"] == "noeviction"
    # No RDB snapshots (docs/jobs-kubernetes.md): a dump.rdb would keep expired jobs too,
    # and the API's rewrites (jobs-api.yaml) need BGREWRITEAOF left as it is.
    assert conf["save"] == '""'
    assert "rename-command" not in conf
    assert "requirepass" not in conf, "the password comes from the Secret, not a ConfigMap"
    # maxmemory leaves room in the container's limit (the rewrite forks).
    redis = container(docs, "redis")
    assert conf["maxmemory"].endswith("gb") and redis["resources"]["limits"]["memory"] \
        .endswith("Gi")
    assert int(conf["maxmemory"][:-2]) < int(redis["resources"]["limits"]["memory"][:-2])


def test_redis_stores_on_its_volume_and_reads_its_config(docs):
    statefulset = one(docs, "StatefulSet", "sdxl-redis")
    spec = statefulset["spec"]
    assert spec["replicas"] == 1 and spec["serviceName"] == "sdxl-redis"
    assert spec["selector"]["matchLabels"] == REDIS
    redis = container(docs, "redis")
    mounts = {m["mountPath"]: m for m in redis["volumeMounts"]}
    # `dir` of the config is the volume claimed for each replica.
    data = mounts[conf_values(redis_conf(docs))["dir"]]
    (claim,) = spec["volumeClaimTemplates"]
    assert data["name"] == claim["metadata"]["name"] and not data.get("readOnly")
    # The config file the start script names is the ConfigMap's.
    conf_path = re.search(r"redis-server (\S+) -", redis["args"][0]).group(1)
    volume = next(v for v in spec["template"]["spec"]["volumes"]
                  if v["name"] == mounts[str(Path(conf_path).parent)]["name"])
    assert volume["configMap"]["name"].startswith("sdxl-redis-config")
    assert Path(conf_path).name == "redis.conf"
    # The image is pinned to a version (the digest is the operator's: docs say so).
    tag = redis["image"].rsplit(":", 1)[1]
    assert redis["image"].startswith("redis:") and tag[0].isdigit() and tag.count(".") == 2
    env = env_of(redis)
    assert secret_ref(env["REDIS_PASSWORD"]) == ("sdxl-jobs-redis", "password")
    assert secret_ref(env["REDISCLI_AUTH"]) == ("sdxl-jobs-redis", "password")
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert redis["securityContext"] == server_container(docs)["securityContext"]
    service = one(docs, "Service", "sdxl-redis")["spec"]
    assert service["clusterIP"] == "None" and service["selector"] == REDIS


class RenderedRedis:
    """The Redis container's own start script and config, run with the local redis-server:
    only the port, the bind address and the two directories are moved into a temp dir."""

    def __init__(self, docs: list[dict], where: Path, password: str):
        redis = container(docs, "redis")
        self.port = free_port()
        self.password = password
        self.where = where
        conf = redis_conf(docs)
        moved = {"port 6379": f"port {self.port}", "bind * -::*": "bind 127.0.0.1",
                 "dir /data": f"dir {where}"}
        for line, replacement in moved.items():
            assert line in conf.splitlines(), line
            conf = conf.replace(line, replacement)
        (where / "redis.conf").write_text(conf)
        script = redis["args"][0]
        assert "/etc/redis/redis.conf" in script
        assert "/data/" in script  # where it removes what a rewrite killed midway left
        self.script = script.replace("/etc/redis/redis.conf", str(where / "redis.conf")) \
            .replace("/data/", f"{where}/")
        self.probe = redis["readinessProbe"]["exec"]["command"]
        self.process = Managed(redis["command"] + [self.script], where / "redis.log",
                               env={"PATH": "/usr/bin:/bin", "REDIS_PASSWORD": password})

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def cli(self, *args: str, password: str | None = None) -> str:
        env = {"PATH": "/usr/bin:/bin"}
        if password:
            env["REDISCLI_AUTH"] = password
        done = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *args],
                              capture_output=True, text=True, env=env, timeout=10)
        return done.stdout.strip()

    def start(self, timeout: float = 20.0) -> None:
        self.process.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.process.running():
                raise AssertionError(f"redis exited: {self.process.tail()}")
            if self.cli("ping", password=self.password) == "PONG":
                return
            time.sleep(0.1)
        raise AssertionError(f"redis did not answer: {self.process.tail()}")

    def probe_passes(self) -> bool:
        command = [part.replace("-p 6379", f"-p {self.port}") for part in self.probe]
        assert command != self.probe, "the probe names the port"
        return subprocess.run(command, env={"PATH": "/usr/bin:/bin",
                                            "REDISCLI_AUTH": self.password},
                              timeout=10).returncode == 0


def need_redis() -> None:
    if not (shutil.which("redis-server") and shutil.which("redis-cli")):
        pytest.skip("redis-server is not installed: `apt-get install redis-server` "
                    "(.ci/run does)")


@pytest.fixture(scope="module")
def running_redis(docs, tmp_path_factory):
    need_redis()
    redis = RenderedRedis(docs, tmp_path_factory.mktemp("redis"), secrets.token_hex(20))
    redis.start()
    yield redis
    redis.process.stop()


def test_redis_starts_with_the_secret_password_off_its_command_line(running_redis):
    redis = running_redis
    # The shell execs Redis: the container's PID 1 is redis-server, which gets SIGTERM.
    assert Path(f"/proc/{redis.process.pid}/exe").resolve() == \
        Path(shutil.which("redis-server")).resolve()
    # The password reaches it (NOAUTH without, PONG with) and is neither on its command
    # line nor in any file it was given or wrote.
    (start,) = [line for line in redis.script.splitlines() if "redis-server" in line]
    assert "PASSWORD" not in start
    assert "NOAUTH" in redis.cli("ping")
    written = [path for path in redis.where.rglob("*") if path.is_file()
               and redis.password.encode() in path.read_bytes()]
    assert not written
    assert redis.cli("config", "get", "appendfsync", password=redis.password) \
        .splitlines() == ["appendfsync", "always"]
    assert redis.cli("config", "get", "appendonly", password=redis.password) \
        .splitlines() == ["appendonly", "yes"]
    assert redis.cli("config", "get", "maxmemory-policy", password=redis.password) \
        .splitlines() == ["maxmemory-policy", "noeviction"]
    assert redis.probe_passes()


@pytest.mark.parametrize("password", ["placeholder", "a" * 31, "p@ss/" + "a" * 40, ""])
def test_redis_refuses_to_start_with_a_weak_or_unsafe_password(docs, tmp_path, password):
    need_redis()
    if password == "placeholder":
        password = secret_values(docs)["password"]
    redis = RenderedRedis(docs, tmp_path, password)
    redis.process.start()
    try:
        assert redis.process.process.wait(timeout=20) == 1
    finally:
        redis.process.stop()
    assert "sdxl-jobs-redis: the password" in redis.process.tail()


def test_a_rewrite_the_overlay_redis_was_killed_in_leaves_no_copy_of_its_jobs(docs, tmp_path):
    """A rewrite's partial copy of the whole store (temp-rewriteaof-<pid>.aof) stayed on the
    volume for good after Redis was killed mid-rewrite (OOMKilled): Redis removes it only
    for a rewrite it ends itself. The start script removes it."""
    need_redis()
    redis = RenderedRedis(docs, tmp_path, secrets.token_hex(20))
    redis.start()
    try:
        killed_mid_rewrite(redis.process, redis.url, tmp_path,
                           f"a prompt {secrets.token_hex(8)}".encode())
        redis.start()
        assert sorted(path.name for path in tmp_path.glob("temp-rewriteaof-*")) == []
    finally:
        redis.process.stop()


def test_the_api_probes_against_a_real_api_and_redis(docs, running_redis, tmp_path):
    # The probe paths asked of a real API process, over the Redis the overlay starts.
    api = container(docs, "jobs-api")
    readiness = api["readinessProbe"]["httpGet"]["path"]
    liveness = api["livenessProbe"]["httpGet"]["path"]
    address = f"http://127.0.0.1:{free_port()}"
    process = api_process(running_redis.url, address, tmp_path / "api.log")
    process.start()

    def status(path: str) -> int:
        try:
            with urllib.request.urlopen(address + path, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    try:
        wait_http(address + liveness, 60, process)
        assert status(readiness) == 200
        assert status("/v1/health") == 503, "plain /v1/health would keep the API unready"
        assert status(liveness) == 200
        # Redis gone: out of the Service (not ready), but not restarted (alive).
        running_redis.process.stop()
        assert status(readiness) == 503
        assert status(liveness) == 200
    finally:
        process.stop()
        running_redis.start()


def test_the_api_has_the_overlay_redis_drop_an_expired_job_from_its_files(
        docs, running_redis, tmp_path):
    """The overlay's Redis kept an expired job's prompt in its append-only file until Redis
    rewrote it, which it does once the file has doubled: nothing in the overlay asked. The
    API's environment turns the rewrites on, every 15 minutes; asked every second instead,
    a real API over the Redis the overlay starts (its config and start script) has an
    expired key leave every file of Redis's directory, and no RDB file appears."""
    api = container(docs, "jobs-api")
    literal = {name: item["value"] for name, item in env_of(api).items() if "value" in item}
    assert JobSettings.from_env(literal).redis_rewrite_s == 900  # as the docs say
    canary = f"an expired prompt {secrets.token_hex(8)}"

    def holding() -> list[str]:
        return [path.name for path in running_redis.where.rglob("*")
                if path.is_file() and canary.encode() in path.read_bytes()]

    address = f"http://127.0.0.1:{free_port()}"
    process = api_process(running_redis.url, address, tmp_path / "api.log",
                          {**literal, "SDXL_JOBS_REDIS_REWRITE_S": "1"})
    process.start()
    try:
        wait_http(address + "/openapi.json", 60, process)
        assert running_redis.cli("set", "sdxl:request:canary", canary, "px", "300",
                                 password=running_redis.password) == "OK"
        assert holding(), "the search finds what the files hold"
        wait_until(lambda: not holding(), 1 + 0.1 + 5, "the expired key to leave the files",
                   interval=0.2, detail=holding)
        assert not (running_redis.where / "dump.rdb").exists()
        assert " WARNING " not in process.tail(), process.tail()
    finally:
        process.stop()


# --- the password -------------------------------------------------------------------------

def test_the_secret_url_reaches_the_overlay_redis_with_its_password(docs):
    values = secret_values(docs)
    url = urllib.parse.urlsplit(values["url"])
    assert url.scheme == "redis" and url.password == values["password"]
    assert url.hostname == "sdxl-redis"
    redis_port = one(docs, "Service", "sdxl-redis")["spec"]["ports"][0]["port"]
    assert url.port == redis_port
    # The database KEDA counts in is the one the API and dispatchers use.
    trigger = one(docs, "ScaledObject")["spec"]["triggers"][0]["metadata"]
    assert url.path == f"/{trigger['databaseIndex']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_password_placeholder_is_only_in_the_secret(overlay):
    placeholder = secret_values(rendered(OVERLAY))["password"]
    holders = [f"{doc['kind']}/{doc['metadata']['name']}" for doc in rendered(overlay)
               if placeholder in json.dumps(doc)]
    expected = ["Secret/sdxl-jobs-redis"] if overlay == OVERLAY else []
    assert holders == expected


# --- KEDA --------------------------------------------------------------------------------

def test_keda_counts_the_job_stream_down_to_zero(docs):
    scaled = one(docs, "ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                      "name": "sdxl-serve"}
    assert spec["minReplicaCount"] == 0
    assert spec["maxReplicaCount"] == one(rendered("keda"), "ScaledObject")["spec"][
        "maxReplicaCount"]
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == \
        REFERENCE_BEHAVIOR
    trigger, _ = spec["triggers"]
    assert trigger["name"] == "jobs"
    assert trigger["type"] == "redis-streams" and trigger["metricType"] == "AverageValue"
    metadata = trigger["metadata"]
    # The store's stream. Its length is the jobs not finished (the store deletes an entry
    # when its job ends): one batch of them per replica.
    assert metadata["stream"] == STREAM
    assert int(metadata["streamLength"]) == MODEL_CONFIG["batchSize"]
    # No consumerGroup (the store's group is "dispatchers"): given one, KEDA ignores
    # streamLength and counts the group's pending entries, the running jobs only, which
    # never scales up from zero.
    assert GROUP == "dispatchers" and "consumerGroup" not in metadata
    assert not {"pendingEntriesCount", "lagCount"} & set(metadata)
    # The Redis Service, by a name that resolves from KEDA's namespace.
    service = one(docs, "Service", "sdxl-redis")
    namespace = scaled["metadata"]["namespace"]
    port = service["spec"]["ports"][0]["port"]
    assert metadata["address"] == f"{service['metadata']['name']}.{namespace}.svc:{port}"


def test_keda_keeps_a_dispatcher_while_webhook_events_are_left(docs):
    """The dispatchers send webhooks: a second trigger on the store's webhook stream (an
    entry per event not yet ended) keeps one GPU pod while any is left, or brings one back."""
    jobs, webhooks = one(docs, "ScaledObject")["spec"]["triggers"]
    assert webhooks["name"] == "webhooks" and webhooks["type"] == "redis-streams"
    assert webhooks["metricType"] == "AverageValue"
    assert webhooks["authenticationRef"] == jobs["authenticationRef"]
    metadata = webhooks["metadata"]
    assert metadata["stream"] == STREAM.removesuffix("stream") + "webhooks"
    assert {key: metadata[key] for key in ("address", "databaseIndex")} == \
        {key: jobs["metadata"][key] for key in ("address", "databaseIndex")}
    # Its length, not a consumer group's pending entries (see the jobs trigger).
    assert not {"consumerGroup", "pendingEntriesCount", "lagCount"} & set(metadata)
    assert int(metadata["streamLength"]) == webhooks_module.WAITING_IN_ALL


def test_keda_authenticates_with_the_secret_password(docs):
    trigger = one(docs, "ScaledObject")["spec"]["triggers"][0]
    auth = one(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "password", "name": "sdxl-jobs-redis", "key": "password"}]
    assert "password" not in trigger["metadata"]


# --- the network -------------------------------------------------------------------------

def test_only_the_api_the_gpu_pods_and_keda_reach_redis(docs):
    policy = one(docs, "NetworkPolicy", "sdxl-redis")["spec"]
    assert policy["podSelector"]["matchLabels"] == REDIS
    assert policy["policyTypes"] == ["Ingress", "Egress"] and not policy.get("egress")
    (rule,) = policy["ingress"]
    assert [p["port"] for p in rule["ports"]] == ["redis"]
    inside = [peer["podSelector"]["matchLabels"] for peer in rule["from"]
              if "namespaceSelector" not in peer]
    assert sorted(inside, key=str) == sorted([API, SERVER], key=str)
    (keda,) = [peer for peer in rule["from"] if "namespaceSelector" in peer]
    assert keda["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "keda"}
    # The selectors are the workloads' real labels.
    labels = {doc["metadata"]["name"]: doc["spec"]["template"]["metadata"]["labels"]
              for doc in docs if doc["kind"] in ("Deployment", "StatefulSet")}
    assert matches(SERVER, labels["sdxl-serve"]) and matches(API, labels["sdxl-jobs-api"])
    assert matches(REDIS, labels["sdxl-redis"])


def test_the_gpu_pods_and_the_api_may_reach_redis_and_dns_only(docs):
    for name in ("sdxl-serve", "sdxl-jobs-api"):
        egress = one(docs, "NetworkPolicy", name)["spec"]["egress"]
        destinations = []
        for rule in egress:
            for peer in rule["to"]:
                destinations.append((json.dumps(peer["podSelector"]["matchLabels"],
                                                sort_keys=True),
                                     sorted(p["port"] for p in rule["ports"])))
        assert sorted(destinations) == sorted([
            (json.dumps(REDIS, sort_keys=True), [6379]),
            (json.dumps({"k8s-app": "kube-dns"}), [53, 53])]), name
    ingress = one(docs, "NetworkPolicy", "sdxl-jobs-api")["spec"]["ingress"]
    assert [p["port"] for rule in ingress for p in rule["ports"]] == ["http", "http"]
    assert ingress[0]["from"] == [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/component": "gateway"}}}]


# --- monitoring --------------------------------------------------------------------------

def test_the_api_is_scraped_where_it_serves_metrics(docs):
    monitor = one(docs, "PodMonitor", "sdxl-jobs-api")["spec"]
    assert monitor["selector"]["matchLabels"] == API
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"


def test_no_dispatcher_alert_waits_for_a_scale_from_zero(docs):
    # It must not fire while a scale from zero is still on its way: KEDA's poll, a GPU
    # node, then the pod's startup probe budget.
    rule = next(r for group in one(docs, "PrometheusRule", "sdxl-jobs")["spec"]["groups"]
                for r in group["rules"] if r.get("alert") == "SDXLJobsNoDispatcher")
    threshold = float(re.search(r"sdxl_jobs_oldest_queued_age_seconds\)\s*>\s*(\d+)",
                                rule["expr"]).group(1))
    startup = server_container(docs)["startupProbe"]
    scale_from_zero = (one(docs, "ScaledObject")["spec"]["pollingInterval"] + GPU_NODE_S
                       + startup["periodSeconds"] * startup["failureThreshold"])
    assert threshold >= scale_from_zero
    assert "sdxl_jobs_dispatchers) == 0" in " ".join(rule["expr"].split())
    # Jobs left running by a pod that went are not queued: their half waits as long.
    windows = re.findall(r"_over_time\(sdxl_jobs_\w+\[(\d+)m\]\)", rule["expr"])
    assert len(windows) == 2 and all(int(m) * 60 >= scale_from_zero for m in windows)


# --- the image ---------------------------------------------------------------------------

def test_the_image_holds_the_job_package():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^COPY jobs jobs$", dockerfile, re.MULTILINE)
