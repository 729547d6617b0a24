"""The Kubernetes deployment (deploy/): rendered, schema-checked, policy-scanned, and wired to the code.

- Every overlay renders with kustomize (the one built into kubectl) and validates against the
  Kubernetes OpenAPI schemas (kubernetes-validate, strict, offline), for the oldest and the newest
  Kubernetes version it claims; deliberately broken manifests are rejected.
- checkov scans the rendered overlays and the Dockerfile: no failed check, and every skipped one is
  justified in the manifests and listed here; an insecure variant fails the scan.
- Wiring: the arguments in the overlays' ConfigMaps are parsed by the real parsers
  (``truepolicy.cli.build_parser()``, then SGLang's own for what ``truepolicy server`` passes on), and
  the ports, probes, secret, environment and NetworkPolicy agree with what the CLI reads and serves.
- ``truepolicy-pod`` (deploy/pod/truepolicy_pod.py), the container's supervisor and probe, does what
  the manifests rely on; one test runs it with the cpu-demo ConfigMap on the real stack.

The tools come from ``.venv-deploy`` (scripts/setup-deploy-venv.sh, run by ``make test``).
"""

from __future__ import annotations

import copy
import http.server
import importlib.util
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
TOOLS = ROOT / ".venv-deploy" / "bin"
OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
# Ids "overlays/<name>": tests/conftest.py skips any test with the keyword "gpu" on a machine without
# one, and rendering the gpu overlay needs none.
OVERLAY_PARAMS = [pytest.param(name, id=f"overlays/{name}") for name in OVERLAYS]
# The oldest Kubernetes the manifests claim (deploy/README.md) and the newest schema bundled.
K8S_VERSIONS = ("1.29.0", "1.37.0")
TRAINER_LABEL = {"truepolicy.io/trainer": "true"}
EXAMPLE = DEPLOY / "examples" / "trainer-job.yaml"
# Every checkov skip, per scanned file; a new one must be justified where it is made AND added here.
# CKV_K8S_43: image digest unknown here; CKV_K8S_15: IfNotPresent for the locally loaded demo image;
# CKV2_K8S_6: the trainer example's NetworkPolicy is the training job's; CKV_DOCKER_2: no
# HEALTHCHECK (Kubernetes probes); CKV_DOCKER_7: `FROM base-${VARIANT}` names a pinned stage.
EXPECTED_SKIPS = {
    "cpu-demo.yaml": {"CKV_K8S_43", "CKV_K8S_15"},
    "gpu.yaml": {"CKV_K8S_43"},
    "trainer-job.yaml": {"CKV_K8S_43", "CKV_K8S_15", "CKV2_K8S_6"},
    "Dockerfile": {"CKV_DOCKER_2", "CKV_DOCKER_7"},
}


def tool(name: str) -> str:
    path = TOOLS / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `make test` or `bash scripts/setup-deploy-venv.sh`")
    return str(path)


def load_pod_module():
    spec = importlib.util.spec_from_file_location("truepolicy_pod", DEPLOY / "pod" / "truepolicy_pod.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pod = load_pod_module()


# ---- rendering ---------------------------------------------------------------------------------
def kustomize(path: Path) -> str:
    proc = subprocess.run(
        [tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"kustomize {path} failed:\n{proc.stderr}"
    return proc.stdout


class Rendered:
    def __init__(self, name: str, text: str, path: Path):
        self.name, self.text, self.path = name, text, path
        self.docs = [d for d in yaml.safe_load_all(text) if d]

    def all(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict:
        found = [d for d in self.all(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.name}: expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    @property
    def statefulset(self) -> dict:
        return self.one("StatefulSet")

    @property
    def pod_spec(self) -> dict:
        return self.statefulset["spec"]["template"]["spec"]

    @property
    def container(self) -> dict:
        (c,) = [c for c in self.pod_spec["containers"] if c["name"] == "rollout"]
        return c

    def mount(self, volume: str) -> dict:
        (m,) = [m for m in self.container["volumeMounts"] if m["name"] == volume]
        return m

    def volume(self, name: str) -> dict:
        (v,) = [v for v in self.pod_spec["volumes"] if v["name"] == name]
        return v

    def config_map(self) -> dict:
        return self.one("ConfigMap", self.volume("config")["configMap"]["name"])

    def args(self, key: str) -> list[str]:
        """server.args / sidecar.args, split as truepolicy-pod splits them in the container."""
        return pod.split_args(self.config_map()["data"][key])

    def port(self, name: str) -> int:
        (p,) = [p["containerPort"] for p in self.container["ports"] if p["name"] == name]
        return p


@pytest.fixture(scope="session")
def rendered(tmp_path_factory) -> dict[str, Rendered]:
    out = tmp_path_factory.mktemp("rendered")
    result = {}
    for name in OVERLAYS:
        text = kustomize(DEPLOY / "overlays" / name)
        path = out / f"{name}.yaml"
        path.write_text(text)
        result[name] = Rendered(name, text, path)
    return result


def test_there_are_the_two_overlays():
    assert {"cpu-demo", "gpu"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAY_PARAMS)
def test_overlay_renders_the_whole_deployment(rendered, overlay):
    r = rendered[overlay]
    kinds = sorted(d["kind"] for d in r.docs)
    for kind in (
        "Namespace", "ServiceAccount", "ConfigMap", "StatefulSet", "NetworkPolicy", "PodDisruptionBudget",
    ):  # fmt: skip
        assert kind in kinds, f"{overlay}: no {kind} in {kinds}"
    assert len(r.all("Service")) == 2
    namespace = r.one("Namespace")["metadata"]["name"]
    for d in r.docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == namespace, d["metadata"]["name"]


# ---- Kubernetes schemas ------------------------------------------------------------------------
def validate(path: Path, version: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAY_PARAMS)
def test_overlay_is_valid_against_the_kubernetes_schemas(rendered, overlay, version):
    proc = validate(rendered[overlay].path, version)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_trainer_example_is_valid_against_the_kubernetes_schemas(version):
    proc = validate(EXAMPLE, version)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _typo(docs):  # an unknown field (strict validation rejects it)
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    sts["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"


def _wrong_type(docs):
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    sts["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "thirty-thousand"


def _missing_required(docs):
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    del sts["spec"]["selector"]


def _bad_enum_as_type(docs):
    pdb = next(d for d in docs if d["kind"] == "PodDisruptionBudget")
    pdb["spec"]["selector"] = ["app.kubernetes.io/name=truepolicy-rollout"]


@pytest.mark.parametrize("breakage", [_typo, _wrong_type, _missing_required, _bad_enum_as_type])
def test_a_broken_manifest_is_rejected(rendered, tmp_path, breakage):
    docs = copy.deepcopy(rendered["cpu-demo"].docs)
    breakage(docs)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    proc = validate(path, K8S_VERSIONS[-1])
    assert proc.returncode != 0, f"{breakage.__name__} was not rejected:\n{proc.stdout}"
    assert "error" in (proc.stdout + proc.stderr).lower()


def test_a_broken_kustomization_does_not_render(tmp_path):
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    (tmp_path / "deploy" / "base" / "networkpolicy.yaml").unlink()
    proc = subprocess.run(
        [tool("kubectl"), "kustomize", str(tmp_path / "deploy" / "overlays" / "cpu-demo")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "networkpolicy.yaml" in proc.stderr


# ---- policy scan -------------------------------------------------------------------------------
def _insecure(docs: list[dict]) -> list[dict]:
    """The cpu-demo StatefulSet, made insecure in ways checkov must catch."""
    sts = copy.deepcopy(next(d for d in docs if d["kind"] == "StatefulSet"))
    sts["metadata"]["name"] = "insecure"
    c = sts["spec"]["template"]["spec"]["containers"][0]
    c["securityContext"] = {"privileged": True, "allowPrivilegeEscalation": True, "runAsUser": 0}
    del c["readinessProbe"]
    del c["resources"]["limits"]
    return [sts]


def checkov(paths: list[Path], frameworks: list[str]) -> list[dict]:
    cmd = [tool("checkov"), "--skip-download", "--output", "json", "--framework", *frameworks]
    for p in paths:
        cmd += ["-f", str(p)]
    # Offline: no platform API key, no policy download (--skip-download), no mapping fetch.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BC_", "PRISMA_"))}
    env["BC_SKIP_MAPPING"] = "TRUE"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    try:
        reports = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"checkov printed no JSON (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr}")
    return reports if isinstance(reports, list) else [reports]


@pytest.fixture(scope="module")
def scan(rendered, tmp_path_factory):
    out = tmp_path_factory.mktemp("scan")
    insecure = out / "insecure.yaml"
    insecure.write_text(yaml.safe_dump_all(_insecure(rendered["cpu-demo"].docs)))
    paths = [r.path for r in rendered.values()] + [EXAMPLE, ROOT / "Dockerfile", insecure]
    return {r["check_type"]: r for r in checkov(paths, ["kubernetes", "dockerfile"])}, insecure


def test_policy_scan_passes_with_only_justified_skips(scan):
    reports, insecure = scan
    assert set(reports) == {"kubernetes", "dockerfile"}
    skips: dict[str, set[str]] = {}
    scanned: set[str] = set()
    for kind, report in reports.items():
        results = report["results"]
        failed = [
            f"{c['check_id']} {c['resource']} ({c['file_path']})"
            for c in results["failed_checks"]
            if Path(c["file_path"]).name != insecure.name
        ]
        assert not failed, f"checkov {kind} failures:\n" + "\n".join(failed)
        assert len(results["passed_checks"]) > 30, f"checkov ran few {kind} checks"
        scanned |= {Path(c["file_path"]).name for c in results["passed_checks"]}
        for c in results["skipped_checks"]:
            skips.setdefault(Path(c["file_path"]).name, set()).add(c["check_id"])
            reason = (c.get("check_result") or {}).get("suppress_comment", "")
            assert len(reason.split()) >= 5, f"{c['check_id']} skipped without a reason: {reason!r}"
    assert scanned >= set(EXPECTED_SKIPS), f"not scanned: {set(EXPECTED_SKIPS) - scanned}"
    skips.pop(insecure.name, None)
    assert skips == EXPECTED_SKIPS


def test_policy_scan_fails_an_insecure_manifest(scan):
    reports, insecure = scan
    failed = {
        c["check_id"]
        for c in reports["kubernetes"]["results"]["failed_checks"]
        if Path(c["file_path"]).name == insecure.name
    }
    # privileged, privilege escalation, root, no readiness probe, no CPU / memory limits
    assert {"CKV_K8S_16", "CKV_K8S_20", "CKV_K8S_9", "CKV_K8S_11", "CKV_K8S_13"} <= failed, failed


# ---- wiring: the manifests against the code ----------------------------------------------------
@pytest.fixture(scope="module")
def cli_parser():
    from truepolicy.cli import build_parser

    return build_parser()


@pytest.fixture(scope="module")
def sglang_parser():
    import argparse

    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(exit_on_error=False)
    ServerArgs.add_cli_args(parser)
    return parser


def parse_strict(parser, argv: list[str]):
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"the CLI rejects {shlex.join(argv)} (exit {exc.code}); see its error above")


def sidecar_opts(r: Rendered, cli_parser):
    return parse_strict(cli_parser, ["sidecar", *r.args("sidecar.args")])


@pytest.mark.parametrize("overlay", OVERLAY_PARAMS)
def test_server_args_are_ones_truepolicy_and_sglang_accept(rendered, overlay, cli_parser, sglang_parser):
    from server_patches import launcher

    r = rendered[overlay]
    opts, rest = cli_parser.parse_known_args(["server", *r.args("server.args")])
    assert opts.command == "server"
    plan = launcher.plan_launch(opts, rest, {})
    assert plan.argv[1:3] == ["-m", "sglang.launch_server"]
    try:
        sglang = sglang_parser.parse_args(plan.argv[3:])
    except (SystemExit, Exception) as exc:  # argparse errors: unknown flag, bad choice, bad type
        pytest.fail(f"SGLang 0.5.15 rejects {shlex.join(plan.argv[3:])}: {exc}")
    # Loopback only: SGLang's admin endpoints must not be reachable from outside the pod.
    assert sglang.host == "127.0.0.1"
    assert sglang.device == opts.device
    models = r.mount("models")["mountPath"]
    assert Path(opts.model_path).is_relative_to(models), "the model must come from the models volume"


@pytest.mark.parametrize("overlay", OVERLAY_PARAMS)
def test_server_args_are_the_ones_make_demo_serves_with(rendered, overlay):
    from truepolicy import demo

    args = rendered[overlay].args("server.args")
    wanted = list(demo.SERVER_ARGS)
    if overlay == "gpu":  # a real model: its own KV cache size and GPU memory split
        cuda = list(demo.CUDA_SERVER_ARGS)
        i = cuda.index("--mem-fraction-static")
        wanted = ["--skip-tokenizer-init", *cuda[:i], *cuda[i + 2 :]]
    for i, word in enumerate(wanted):
        if word.startswith("--"):
            value = wanted[i + 1] if i + 1 < len(wanted) and not wanted[i + 1].startswith("--") else None
            assert word in args, f"{overlay}: `make demo` serves with {word}"
            if value is not None:
                assert pod.flag_value(args, word) == value, f"{overlay}: {word} {value} as `make demo`"


@pytest.mark.parametrize("overlay", OVERLAY_PARAMS)
def test_sidecar_args_ports_and_token_match_the_cli(rendered, overlay, cli_parser, tmp_path):
    from weight_sync.sidecar import settings as settings_mod

    r = rendered[overlay]
    opts = sidecar_opts(r, cli_parser)
    assert hasattr(opts, "grpc_port"), "the sidecar CLI has no --grpc-port"
    # The token file is the Secret's key `token` where the pod mounts it.
    secret_volume = r.volume("sidecar-token")["secret"]
    assert secret_volume["secretName"] == "truepolicy-sidecar-token"
    (item,) = [i for i in secret_volume["items"] if i["key"] == "token"]
    assert opts.token_file == f"{r.mount('sidecar-token')['mountPath']}/{item['path']}"
    # The settings the sidecar would run with (the token read from a stand-in file).
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    opts.token_file = str(token)
    settings = settings_mod.from_args(opts, environ={})
    assert settings.token == "t0ken" and settings.host == "0.0.0.0"
    assert settings.http_port == r.port("http")
    assert settings.grpc_port == r.port("grpc")
    # The sidecar feeds the server of this pod: its URL is the server's loopback address.
    server_args = r.args("server.args")
    assert settings.sglang_url == "http://127.0.0.1:" + pod.flag_value(server_args, "--port", "30000")
    assert opts.device == pod.flag_value(server_args, "--device"), "buckets must land where SGLang runs"
    # Both Services expose these two container ports under their names.
    for svc in r.all("Service"):
        ports = {p["name"]: p for p in svc["spec"]["ports"]}
        assert ports["http"]["targetPort"] == "http" and ports["http"]["port"] == settings.http_port
        assert ports["grpc"]["targetPort"] == "grpc" and ports["grpc"]["port"] == settings.grpc_port
    if overlay == "cpu-demo":  # ships its (demo) Secret; the gpu overlay expects one to exist
        secret = r.one("Secret", "truepolicy-sidecar-token")
        assert set(secret.get("data", {})) | set(secret.get("stringData", {})) == {"token"}


@pytest.mark.parametrize("overlay", OVERLAY_PARAMS)
def test_environment_names_are_ones_the_code_reads(rendered, overlay):
    from parity import tiny_models
    from server_patches.plugin import ENABLE_ENV
    from weight_sync.sidecar import settings as settings_mod

    known = {settings_mod.TOKEN_ENV, settings_mod.SGLANG_KEY_ENV, tiny_models.CACHE_ENV, ENABLE_ENV}
    r = rendered[overlay]
    for c in r.pod_spec["containers"] + r.pod_spec.get("initContainers", []):
        for env in c.get("env", []):
            if env["name"].startswith("TRUEPOLICY_"):
                assert env["name"] in known, f"{c['name']}: {env['name']} is read by nothing"
            # Secrets go in files: an env var is inherited by SGLang and every child process.
            assert "secretKeyRef" not in env.get("valueFrom", {}), env["name"]
        assert "envFrom" not in c


@pytest.mark.parametrize("overlay", OVERLAY_PARAMS)
def test_probes_and_entrypoint_are_wired(rendered, overlay):
    from weight_sync.sidecar import settings as settings_mod
    from weight_sync.sidecar.app import create_app
    from weight_sync.sidecar.updater import Updater

    r = rendered[overlay]
    c = r.container
    config_dir = r.mount("config")["mountPath"]
    assert set(r.config_map()["data"]) == {pod.SERVER_ARGS, pod.SIDECAR_ARGS}
    # The container runs `truepolicy-pod run` on the mounted ConfigMap ...
    assert c["command"][0] == "truepolicy-pod"
    main = pod.build_parser().parse_args(c["command"][1:])
    assert main.command == "run" and str(main.config_dir) == config_dir
    # ... startup and liveness run `truepolicy-pod health` on it: SGLang's /health on its --port ...
    for probe in ("startupProbe", "livenessProbe"):
        command = c[probe]["exec"]["command"]
        assert command[0] == "truepolicy-pod"
        opts = pod.build_parser().parse_args(command[1:])
        assert opts.command == "health" and str(opts.config_dir) == config_dir
        assert c[probe]["timeoutSeconds"] > opts.timeout, "the probe must outlast SGLang's own check"
    port = pod.flag_value(r.args("server.args"), "--port")
    assert pod.sglang_health_url(r.args("server.args")) == f"http://127.0.0.1:{port}/health"
    # ... and readiness is the sidecar's /ready, a route the sidecar app really serves.
    ready = c["readinessProbe"]["httpGet"]
    assert ready["port"] == "http" and ready["path"] == "/ready"
    settings = settings_mod.Settings(sglang_url="http://127.0.0.1:9", token="x")
    routes = {route.path for route in create_app(Updater(settings), attach_in_background=False).routes}
    assert ready["path"] in routes
    # The image puts truepolicy-pod on the PATH.
    assert "/deploy/pod/truepolicy_pod.py /usr/local/bin/truepolicy-pod" in (ROOT / "Dockerfile").read_text()


@pytest.mark.parametrize("overlay", OVERLAY_PARAMS)
def test_network_policy_admits_only_the_trainer_to_the_api(rendered, overlay):
    r = rendered[overlay]
    policy = r.one("NetworkPolicy")["spec"]
    labels = r.statefulset["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    rollout = {"podSelector": {"matchLabels": policy["podSelector"]["matchLabels"]}}
    trainer = {"podSelector": {"matchLabels": TRAINER_LABEL}}
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    # The process-group ports: exactly the pod's ephemeral range, where NCCL / gloo listen.
    (sysctl,) = [s for s in r.pod_spec["securityContext"]["sysctls"] if s["name"].endswith("port_range")]
    assert sysctl["name"] == "net.ipv4.ip_local_port_range"
    pg_range = [int(x) for x in sysctl["value"].split()]
    for name in ("http", "grpc"):
        assert not pg_range[0] <= r.port(name) <= pg_range[1], f"{name} inside the ephemeral range"

    def ports(rule):
        named = {p["port"] for p in rule["ports"] if "endPort" not in p}
        ranges = [[p["port"], p["endPort"]] for p in rule["ports"] if "endPort" in p]
        return named, ranges

    by_peer = {json.dumps(rule["from"], sort_keys=True): ports(rule) for rule in policy["ingress"]}
    assert set(by_peer) == {json.dumps([trainer], sort_keys=True), json.dumps([rollout], sort_keys=True)}
    # The trainer: the sidecar's two ports (mutating calls included) and the process group ...
    named, ranges = by_peer[json.dumps([trainer], sort_keys=True)]
    assert named == {p["name"] for p in r.container["ports"]} == {"http", "grpc"}
    assert ranges == [pg_range]
    # ... the other replicas (ranks of the same group): the process group only, no API port.
    assert by_peer[json.dumps([rollout], sort_keys=True)] == (set(), [pg_range])
    # Egress: the trainer (its TCPStore and process-group ports), the replicas' group ports, DNS.
    egress = {json.dumps(rule["to"], sort_keys=True): rule.get("ports") for rule in policy["egress"]}
    assert egress[json.dumps([trainer], sort_keys=True)] is None  # all ports
    assert ports({"ports": egress[json.dumps([rollout], sort_keys=True)]}) == (set(), [pg_range])
    assert len(egress) == 3


def test_trainer_example_is_what_the_rollout_side_admits(rendered, cli_parser):
    r = rendered["cpu-demo"]
    job = yaml.safe_load(EXAMPLE.read_text())
    pod_spec = job["spec"]["template"]["spec"]
    assert job["metadata"]["namespace"] == r.one("Namespace")["metadata"]["name"]
    assert job["spec"]["template"]["metadata"]["labels"].items() >= TRAINER_LABEL.items()
    (c,) = pod_spec["containers"]
    assert c["image"] == r.container["image"]
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    # Not the replicas' process-group range: the trainer's store port must not be taken by it.
    (sysctl,) = r.pod_spec["securityContext"]["sysctls"]
    low, high = (int(x) for x in sysctl["value"].split())
    assert not low <= int(env["STORE_PORT"]["value"]) <= high
    # Every replica by its stable name, on the sidecar's HTTP port.
    sts = r.statefulset
    http_port = sidecar_opts(r, cli_parser).http_port
    urls = env["SIDECAR_URLS"]["value"].split(",")
    assert urls == [
        f"http://{sts['metadata']['name']}-{i}.{sts['spec']['serviceName']}:{http_port}"
        for i in range(sts["spec"]["replicas"])
    ]
    # The same Secret and key as the sidecar.
    volume = next(v for v in pod_spec["volumes"] if "secret" in v)
    assert volume["secret"]["secretName"] == r.volume("sidecar-token")["secret"]["secretName"]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == volume["name"]]
    (item,) = volume["secret"]["items"]
    assert item["key"] == "token"
    assert env["SIDECAR_TOKEN_FILE"]["value"] == f"{mount['mountPath']}/{item['path']}"


def test_readme_names_what_the_code_reads(rendered, cli_parser):
    from weight_sync.sidecar import settings as settings_mod

    text = (DEPLOY / "README.md").read_text()
    r = rendered["cpu-demo"]
    opts = sidecar_opts(r, cli_parser)
    for needle in (
        settings_mod.TOKEN_ENV, 'truepolicy.io/trainer: "true"', "truepolicy-sidecar-token",
        f"{opts.http_port} `http`", f"{opts.grpc_port} `grpc`", "40000-44999",
        f":{opts.http_port}", f":{opts.grpc_port}",
    ):  # fmt: skip
        assert needle in text, needle
    # The in-pod check the README gives parses, on the model the cpu-demo server serves.
    (line,) = [ln for ln in text.splitlines() if "truepolicy parity-check" in ln]
    argv = shlex.split(line)[1:]
    check = parse_strict(cli_parser, argv)
    assert str(check.model_path) == pod.flag_value(r.args("server.args"), "--model-path")
    assert check.url == f"http://127.0.0.1:{pod.flag_value(r.args('server.args'), '--port')}"


@pytest.mark.parametrize("overlay", OVERLAY_PARAMS)
def test_statefulset_services_and_budget_fit_together(rendered, overlay):
    r = rendered[overlay]
    sts = r.statefulset["spec"]
    labels = sts["template"]["metadata"]["labels"]
    headless = r.one("Service", sts["serviceName"])["spec"]
    assert headless["clusterIP"] == "None" and headless["selector"].items() <= labels.items()
    api = r.one("Service", "truepolicy-rollout-api")["spec"]
    assert api["type"] == "ClusterIP" and api["selector"].items() <= labels.items()
    pdb = r.one("PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items() and pdb["maxUnavailable"] == 1
    # /dev/shm is memory-backed, and fits in the memory limit it is charged to.
    dshm = r.volume("dshm")["emptyDir"]
    assert dshm["medium"] == "Memory" and r.mount("dshm")["mountPath"] == "/dev/shm"
    assert _bytes(dshm["sizeLimit"]) < _bytes(r.container["resources"]["limits"]["memory"])
    assert r.pod_spec["securityContext"]["runAsNonRoot"] is True
    assert r.pod_spec["automountServiceAccountToken"] is False
    if overlay == "gpu":
        limits = r.container["resources"]["limits"]
        assert (
            int(limits["nvidia.com/gpu"]) >= 1 and pod.flag_value(r.args("server.args"), "--device") == "cuda"
        )


def _bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity[: -len(suffix)]) * factor
    return int(quantity)


def test_cpu_demo_init_container_builds_the_model_the_server_serves(rendered, tmp_path):
    from parity.tiny_models import build_tiny_model

    r = rendered["cpu-demo"]
    (init,) = r.pod_spec["initContainers"]
    assert init["image"] == r.container["image"]
    env = {e["name"]: e["value"] for e in init["env"]}
    models = r.mount("models")["mountPath"]
    assert env["MODEL_DIR"] == models
    # Run the init container's own command, with the models volume at a temporary directory.
    run_env = {**os.environ, **env, "MODEL_DIR": str(tmp_path), "HOME": str(tmp_path / "home")}
    run_env.pop("TRUEPOLICY_MODEL_CACHE", None)
    argv = [sys.executable if init["command"][0] == "python" else init["command"][0], *init["command"][1:]]
    proc = subprocess.run(argv, env=run_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = tmp_path / Path(pod.flag_value(r.args("server.args"), "--model-path")).relative_to(models)
    assert (served / "config.json").is_file() and list(served.glob("*.safetensors"))
    # The model `make demo` serves: the same tiny Qwen3 (seed 0), byte for byte.
    reference = build_tiny_model("qwen3", seed=0, cache_dir=tmp_path / "reference")
    for f in reference.iterdir():
        assert (served / f.name).read_bytes() == f.read_bytes(), f.name


# ---- truepolicy-pod ----------------------------------------------------------------------------
FAKE_TRUEPOLICY = """#!/usr/bin/env bash
# A stand-in `truepolicy`: behaviour per subcommand from $FAKE_<SUBCOMMAND> (a shell snippet).
what=$1; shift
echo "$what $*" >> "$FAKE_LOG"
if [ "$what" = server ]; then eval "$FAKE_SERVER"; else eval "$FAKE_SIDECAR"; fi
"""


def run_pod(tmp_path: Path, server: str, sidecar: str, *, signal_after: float | None = None, grace=5.0):
    config = tmp_path / "config"
    config.mkdir(exist_ok=True)
    (config / "server.args").write_text("# comment\n--model-path '/m o' --port 1234  # trailing\n")
    (config / "sidecar.args").write_text("--http-port 1\n")
    fake = tmp_path / "truepolicy"
    fake.write_text(FAKE_TRUEPOLICY)
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {**os.environ, "FAKE_LOG": str(log), "FAKE_SERVER": server, "FAKE_SIDECAR": sidecar}
    argv = [sys.executable, str(DEPLOY / "pod" / "truepolicy_pod.py"), "run", "--config-dir", str(config)]
    argv += ["--truepolicy", str(fake), "--grace", str(grace)]
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    if signal_after is not None:
        time.sleep(signal_after)
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    calls = log.read_text().splitlines() if log.exists() else []
    return proc.returncode, calls, err


def test_pod_passes_the_configmap_args_and_exits_with_the_server(tmp_path):
    code, calls, err = run_pod(tmp_path, server="sleep 3; exit 7", sidecar="exit 1")
    assert code == 7, err
    assert "server --model-path /m o --port 1234" in calls
    # The sidecar exited at once and was restarted alone (1 s, then 2 s back-off) while the server ran.
    assert calls.count("sidecar --http-port 1") >= 2, calls
    assert calls.count("server --model-path /m o --port 1234") == 1


def test_pod_stops_both_on_sigterm(tmp_path):
    marker = tmp_path / "stopped"
    on_term = f"trap 'echo $$ >> {marker}; exit 0' TERM; sleep 30 & wait"
    t0 = time.monotonic()
    code, calls, err = run_pod(tmp_path, server=on_term, sidecar=on_term, signal_after=2.0)
    assert code == 0, err
    assert time.monotonic() - t0 < 15
    assert len(marker.read_text().split()) == 2, "both processes get SIGTERM"


def test_pod_kills_what_ignores_sigterm_after_the_grace_period(tmp_path):
    stubborn = "trap '' TERM; sleep 30"
    t0 = time.monotonic()
    code, _, err = run_pod(tmp_path, server=stubborn, sidecar=stubborn, signal_after=1.0, grace=2.0)
    assert code == 0, err
    assert time.monotonic() - t0 < 12


def test_pod_stops_on_a_sidecar_configuration_error(tmp_path):
    code, calls, err = run_pod(tmp_path, server="sleep 30", sidecar="exit 2")
    assert code == 2, err
    assert calls.count("sidecar --http-port 1") == 1 and "configuration error" in err


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_pod_health_probe_reads_the_sglang_port_from_server_args(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        (tmp_path / "server.args").write_text(f"--host 0.0.0.0\n--port {port}\n")
        assert pod.main(["health", "--config-dir", str(tmp_path), "--timeout", "5"]) == 0
        _Health.status = 503
        assert pod.main(["health", "--config-dir", str(tmp_path), "--timeout", "5"]) == 1
    finally:
        _Health.status = 200
        server.shutdown()
        server.server_close()
    assert pod.main(["health", "--config-dir", str(tmp_path), "--timeout", "2"]) == 1  # nothing listens


def test_pod_reads_args_like_a_shell_without_a_shell(tmp_path):
    path = tmp_path / "a.args"
    path.write_text("# c\n--a 'x y'  # c\n--b=$(touch)`id`;$HOME\n--c \"q\"\n")
    assert pod.read_args(path) == ["--a", "x y", "--b=$(touch)`id`;$HOME", "--c", "q"]
    assert pod.flag_value(["--port", "1", "--port=2"], "--port") == "2"
    assert pod.sglang_health_url([]) == "http://127.0.0.1:30000/health"


# ---- the cpu-demo pod's process tree on the real stack ----------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_flag(args: list[str], flag: str, value: str) -> list[str]:
    assert flag in args, f"{flag} not in {args}"
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


@pytest.mark.server
def test_cpu_demo_pod_runs_the_real_server_and_sidecar(rendered, tmp_path):
    """`truepolicy-pod run` with the cpu-demo ConfigMap (paths and ports moved to this machine's):
    the sidecar becomes ready (the readiness probe), `truepolicy-pod health` passes (the liveness
    probe), and SIGTERM stops the whole tree."""
    from parity.tiny_models import build_tiny_model
    from truepolicy.sglang_process import free_port as sglang_free_port

    r = rendered["cpu-demo"]
    model = build_tiny_model("qwen3", seed=0)
    sglang_port, http_port, grpc_port = sglang_free_port(), free_port(), free_port()
    server_args = set_flag(r.args("server.args"), "--model-path", str(model))
    server_args = set_flag(server_args, "--port", str(sglang_port))
    sidecar_args = set_flag(r.args("sidecar.args"), "--sglang-url", f"http://127.0.0.1:{sglang_port}")
    sidecar_args = set_flag(sidecar_args, "--host", "127.0.0.1")  # nothing beyond loopback here
    sidecar_args = set_flag(sidecar_args, "--http-port", str(http_port))
    sidecar_args = set_flag(sidecar_args, "--grpc-port", str(grpc_port))
    (tmp_path / "token").write_text("demo\n")
    sidecar_args = set_flag(sidecar_args, "--token-file", str(tmp_path / "token"))
    config = tmp_path / "etc"
    config.mkdir()
    (config / "server.args").write_text(shlex.join(server_args))
    (config / "sidecar.args").write_text(shlex.join(sidecar_args))
    log = (tmp_path / "pod.log").open("w")
    script = str(DEPLOY / "pod" / "truepolicy_pod.py")
    proc = subprocess.Popen(
        [sys.executable, script, "run", "--config-dir", str(config)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        ready = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = requests.get(f"http://127.0.0.1:{http_port}/ready", timeout=10)
                if ready.status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        tail = (tmp_path / "pod.log").read_text()[-4000:]
        assert ready is not None and ready.status_code == 200, tail
        # The token came from the file the manifest names: mutating calls need it.
        cancel = f"http://127.0.0.1:{http_port}/update_weights/none/cancel"
        assert requests.post(cancel, timeout=10).status_code == 401
        assert requests.post(cancel, headers={"Authorization": "Bearer demo"}, timeout=10).status_code == 404
        # The example trainer's own script pushes new weights to the replica (gloo on loopback here).
        job = yaml.safe_load(EXAMPLE.read_text())
        (trainer,) = job["spec"]["template"]["spec"]["containers"]
        env = {
            **os.environ, "POD_IP": "127.0.0.1", "STORE_PORT": str(free_port()),
            "SIDECAR_URLS": f"http://127.0.0.1:{http_port}", "SIDECAR_TOKEN_FILE": str(tmp_path / "token"),
        }  # fmt: skip
        push = subprocess.run(
            [sys.executable, *trainer["command"][1:]], env=env, capture_output=True, text=True, timeout=300
        )
        assert push.returncode == 0, push.stderr[-3000:]
        assert "pushed demo-step-1" in push.stdout
        version = requests.get(f"http://127.0.0.1:{http_port}/version", timeout=10).json()
        assert version["version"] == "demo-step-1" and version["pushes"] == 1
        health = subprocess.run(
            [sys.executable, script, "health", "--config-dir", str(config)], capture_output=True, timeout=60
        )
        assert health.returncode == 0, health.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, (tmp_path / "pod.log").read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
