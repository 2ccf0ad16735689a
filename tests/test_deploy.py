"""deploy/ loads: promtool and amtool accept every Prometheus and Alertmanager config, the Kubernetes
manifests and compose.yaml agree with each other and with gradwatch's own settings models (names,
labels, ports, secrets, mounted paths), and the aggregator starts with the Deployment's environment."""

from __future__ import annotations

import fnmatch
import importlib.metadata
import json
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any, Iterator
from urllib.parse import urlsplit

import pytest
import yaml

from conftest import free_port
from gradwatch.agent.config import AgentConfig
from gradwatch.cli import main as gradwatch_main
from gradwatch.aggregator.rules import RuleSet
from gradwatch.aggregator.rules.rulefile import export_text
from gradwatch.aggregator.service.config import AggregatorSettings
from gradwatch.demo import stack
from gradwatch.demo.processes import Child
from promtool_cases import require

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
RULE_FILE = DEPLOY / "prometheus" / "rules" / "gradwatch.rules.yml"
PROMETHEUS_RULE = K8S / "prometheusrule.yaml"
PROMETHEUS_CONFIGS = ["prometheus.yml", "prometheus.compose.yml"]
ALERTMANAGER_CONFIGS = ["alertmanager.yml", "alertmanager-pagerduty-slack.yml"]
AGENT_PORT = 9400  # the port every deploy example gives GRADWATCH_METRICS_PORT


def env_names(model: Any) -> dict[str, str]:
    """Environment variable -> field, derived from a pydantic-settings model."""
    prefix = model.model_config["env_prefix"]
    return {(prefix + name).upper(): name for name in model.model_fields}


def settings_from_env(model: Any, env: dict[str, str]) -> Any:
    unknown = set(env) - set(env_names(model))
    assert not unknown, f"not {model.__name__} settings: {sorted(unknown)}"
    return model(**{env_names(model)[k]: v for k, v in env.items()})


# ---- Prometheus ---------------------------------------------------------------------------------

@pytest.mark.parametrize("config", PROMETHEUS_CONFIGS)
def test_prometheus_config_passes_promtool(config):
    proc = subprocess.run([require("promtool"), "check", "config", config], cwd=DEPLOY / "prometheus", capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 14 rules found" in proc.stdout  # it loads the committed rule file


def test_promtool_reads_the_file_sd_targets(tmp_path):
    """The check above covers targets/*.yml too: a broken target file fails it."""
    shutil.copytree(DEPLOY / "prometheus", tmp_path / "prometheus")
    (tmp_path / "prometheus" / "targets" / "broken.yml").write_text("- targets: trainer-0:9400\n  lables: {team: x}\n")
    proc = subprocess.run([require("promtool"), "check", "config", "prometheus.yml"], cwd=tmp_path / "prometheus", capture_output=True, text=True)
    assert proc.returncode != 0 and "targets/*.yml" in proc.stdout + proc.stderr


@pytest.mark.parametrize("config", PROMETHEUS_CONFIGS)
def test_agent_jobs_keep_the_agents_job_label_and_port(config):
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / config).read_text())
    jobs = {c["job_name"]: c for c in prometheus["scrape_configs"]}
    assert "alerting" not in prometheus  # the aggregator pages; Prometheus paging too would double it
    for name in ("gradwatch-agents", "gradwatch-torchrun"):
        assert jobs[name]["honor_labels"] is True, name
    targets = [t for sc in jobs["gradwatch-agents"]["static_configs"] for t in sc["targets"]]
    sd_files = [f for sd in jobs["gradwatch-torchrun"]["file_sd_configs"] for glob in sd["files"]
                for f in (DEPLOY / "prometheus").glob(glob)]
    assert sd_files, "the file_sd example matches no file"
    for path in sd_files:
        groups = yaml.safe_load(path.read_text())
        assert all("job" not in g.get("labels", {}) for g in groups), f"{path}: the agent sets `job`"
        targets += [t for g in groups for t in g["targets"]]
    assert targets and all(t.rsplit(":", 1)[1] == str(AGENT_PORT) for t in targets), targets


# ---- Alertmanager -------------------------------------------------------------------------------

def route_of(config: str, *labels: str) -> str:
    proc = subprocess.run([require("amtool"), "config", "routes", "test", f"--config.file={config}", *labels],
                          cwd=DEPLOY / "alertmanager", capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.parametrize("config", ALERTMANAGER_CONFIGS)
def test_alertmanager_config_passes_amtool_and_routes_by_severity(config):
    proc = subprocess.run([require("amtool"), "check-config", config], cwd=DEPLOY / "alertmanager", capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert route_of(config, "alertname=GradwatchNanGradient", "severity=critical", "job=j") == "training-pager"
    assert route_of(config, "alertname=GradwatchLossPlateau", "severity=warning", "job=j") == "training-chat"


OPERATOR_PROMETHEUS = "prometheus=monitoring/kube-prometheus-stack-prometheus"  # its default external label


@pytest.mark.parametrize("config", ALERTMANAGER_CONFIGS)
def test_operator_prometheus_copies_of_gradwatch_alerts_are_discarded(config):
    """Under the Prometheus Operator, Prometheus sends the PrometheusRule's alerts too: its copies (with
    its external label `prometheus`) are dropped, the aggregator's (without) page, and the cluster's other
    alerts from that Prometheus still reach the receivers."""
    for alert in (["alertname=GradwatchNanGradient", "severity=critical"], ["alertname=GradwatchLossPlateau", "severity=warning"]):
        assert route_of(config, *alert, "job=j", OPERATOR_PROMETHEUS, "prometheus_replica=prometheus-0") == "discard"
    assert route_of(config, "alertname=GradwatchNanGradient", "severity=critical", "job=j", "prometheus=") == "training-pager"
    assert route_of(config, "alertname=KubePodCrashLooping", "severity=critical", OPERATOR_PROMETHEUS) == "training-pager"
    receivers = {r["name"]: r for r in yaml.safe_load((DEPLOY / "alertmanager" / config).read_text())["receivers"]}
    assert receivers["discard"] == {"name": "discard"}  # no integration: nothing is sent


@pytest.mark.parametrize("config", ALERTMANAGER_CONFIGS)
def test_a_stalled_job_inhibits_its_throughput_and_straggler_alerts(config):
    inhibit = yaml.safe_load((DEPLOY / "alertmanager" / config).read_text())["inhibit_rules"]
    (stall,) = [r for r in inhibit if r["source_matchers"] == ['alertname="GradwatchTrainingStalled"']]
    assert stall["equal"] == ["job"] and "GradwatchThroughputDrop|GradwatchStraggler" in stall["target_matchers"][0]


def test_pagerduty_slack_variant_has_the_same_routing_and_keys_from_files():
    plain, real = (yaml.safe_load((DEPLOY / "alertmanager" / c).read_text()) for c in ALERTMANAGER_CONFIGS)
    assert real["route"] == plain["route"] and real["inhibit_rules"] == plain["inhibit_rules"]
    receivers = {r["name"]: r for r in real["receivers"]}
    (pager,) = receivers["training-pager"]["pagerduty_configs"]
    (chat,) = receivers["training-chat"]["slack_configs"]
    assert set(pager) & {"routing_key", "service_key"} == set() and pager["routing_key_file"]
    assert "api_url" not in chat and chat["api_url_file"]


# ---- the PrometheusRule -------------------------------------------------------------------------

def test_committed_prometheusrule_has_not_drifted(tmp_path):
    out = tmp_path / "prometheusrule.yaml"
    assert gradwatch_main(["rules", "export", "--format", "prometheusrule", "-o", str(out)]) == 0
    assert out.read_text() == PROMETHEUS_RULE.read_text() == export_text(RuleSet(), "prometheusrule"), (
        "deploy/kubernetes/prometheusrule.yaml is stale: run "
        "`gradwatch rules export --format prometheusrule -o deploy/kubernetes/prometheusrule.yaml`"
    )


def test_prometheusrule_holds_exactly_the_rule_files_groups(tmp_path):
    rule = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULE_FILE.read_text())
    spec = tmp_path / "spec.yml"
    spec.write_text(yaml.safe_dump(rule["spec"]))
    proc = subprocess.run([require("promtool"), "check", "rules", str(spec)], capture_output=True, text=True)
    assert proc.returncode == 0 and "SUCCESS: 14 rules found" in proc.stdout, proc.stdout + proc.stderr


def test_unknown_export_format_is_refused():
    with pytest.raises(ValueError, match="prometheusrule"):
        export_text(RuleSet(), "helm")


# ---- Kubernetes ---------------------------------------------------------------------------------

def kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


def manifests() -> list[dict]:
    docs = []
    for directory in kustomization_dirs():
        for path in sorted(directory.glob("*.yaml")):
            if path.name != "kustomization.yaml":
                docs += [dict(d, _file=path) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def one(kind: str, name: str) -> dict:
    found = [d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} manifests"
    return found[0]


def containers(workload: dict) -> list[dict]:
    return workload["spec"]["template"]["spec"]["containers"]


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) == {"matchLabels"}, "only matchLabels selectors are checked here"
    return bool(selector["matchLabels"]) and selector["matchLabels"].items() <= labels.items()


def container_env(container: dict) -> dict[str, str]:
    """The container's environment with every secretKeyRef resolved from the Secret manifests."""
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            secret = one("Secret", ref["name"])
            data = secret.get("stringData", {})
            assert ref["key"] in data, f"{var['name']}: Secret {ref['name']} has no key {ref['key']!r}"
            env[var["name"]] = data[ref["key"]]
    return env


def aggregator_env(container: dict) -> dict[str, str]:
    """container_env with the Secret's token replaced by a random one, as its comment tells the operator
    to do: the committed placeholder is refused at start-up (test_placeholder_token_is_refused)."""
    env = container_env(container)
    assert env["GRADWATCH_AGGREGATOR_TOKEN"].startswith("REPLACE-ME")
    return {**env, "GRADWATCH_AGGREGATOR_TOKEN": secrets.token_hex(32)}


def test_kustomizations_list_every_manifest():
    assert [d.relative_to(K8S).as_posix() for d in kustomization_dirs()] == [".", "example-training"]
    for directory in kustomization_dirs():
        listed = yaml.safe_load((directory / "kustomization.yaml").read_text())["resources"]
        present = sorted(p.name for p in directory.glob("*.y*ml") if p.name != "kustomization.yaml")
        assert sorted(listed) == present, directory


def test_manifests_have_the_expected_kinds():
    kinds = {(d["apiVersion"], d["kind"]) for d in manifests()}
    assert kinds == {
        ("v1", "Namespace"), ("v1", "Secret"), ("v1", "PersistentVolumeClaim"), ("apps/v1", "Deployment"),
        ("v1", "Service"), ("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PodMonitor"),
        ("monitoring.coreos.com/v1", "PrometheusRule"), ("batch/v1", "Job"),
    }


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
def test_kustomize_builds_every_kustomization():
    for directory in kustomization_dirs():
        proc = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        built = [d for d in yaml.safe_load_all(proc.stdout) if d]
        raw = [d for d in manifests() if d["_file"].parent == directory]
        assert sorted((d["kind"], d["metadata"]["name"]) for d in built) == sorted((d["kind"], d["metadata"]["name"]) for d in raw)
        assert all(d["metadata"].get("namespace") == "gradwatch" for d in built if d["kind"] != "Namespace")


def test_podmonitor_selects_the_training_pod_on_the_agents_port():
    monitor, job = one("PodMonitor", "gradwatch-agents"), one("Job", "example-training")
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    assert selects(monitor["spec"]["selector"], job["spec"]["template"]["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["honorLabels"] is True
    (trainer,) = containers(job)
    ports = {p["name"]: p["containerPort"] for p in trainer["ports"]}
    config = settings_from_env(AgentConfig, container_env(trainer))
    assert ports[endpoint["port"]] == config.metrics_port == AGENT_PORT
    assert config.aggregator_token.get_secret_value() == container_env(containers(one("Deployment", "gradwatch-aggregator"))[0])["GRADWATCH_AGGREGATOR_TOKEN"]
    url = urlsplit(config.aggregator_url)
    service = one("Service", "gradwatch-aggregator")
    assert url.hostname == f"{service['metadata']['name']}.gradwatch.svc"
    assert url.port in {p["port"] for p in service["spec"]["ports"]}


def test_service_and_servicemonitor_reach_the_aggregator():
    deployment, service = one("Deployment", "gradwatch-aggregator"), one("Service", "gradwatch-aggregator")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"], pod_labels)
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (container,) = containers(deployment)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports or port["targetPort"] in ports.values(), port
    monitor = one("ServiceMonitor", "gradwatch-aggregator")
    assert selects(monitor["spec"]["selector"], service["metadata"]["labels"])
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    settings = settings_from_env(AggregatorSettings, aggregator_env(container))
    assert settings.host == "0.0.0.0" and ports["http"] == settings.port


def test_aggregator_deployment_is_a_single_writer_with_persistent_state():
    deployment = one("Deployment", "gradwatch-aggregator")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    state = PurePosixPath(settings_from_env(AggregatorSettings, aggregator_env(container)).state.as_posix())
    mount = next(m for m in container["volumeMounts"] if state.parent == PurePosixPath(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    one("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    ports = {p["name"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/healthz" and container[probe]["httpGet"]["port"] in ports


def test_every_secret_reference_resolves():
    refs = [v["valueFrom"]["secretKeyRef"] for d in manifests() if d["kind"] in ("Deployment", "Job")
            for c in containers(d) for v in c.get("env", []) if "valueFrom" in v]
    assert len(refs) == 2
    for ref in refs:
        assert ref["key"] in one("Secret", ref["name"]).get("stringData", {}), ref


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_closure(names: set[str]) -> set[str]:
    """These distributions and everything they require (extras excluded), as installed here."""
    seen: set[str] = set()
    todo = [norm(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [norm(re.split(r"[<>=!~\[; (]", r, maxsplit=1)[0]) for r in requires if "extra ==" not in r]
    return seen


# Runs `gradwatch aggregator` with every installed module outside the image's packages made
# unimportable, as in the image built by aggregator.Dockerfile.
IMAGE_LAUNCHER = """
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))
class NotInImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (not in the aggregator image)", name=name)
sys.meta_path.insert(0, NotInImage())
from gradwatch.cli import main
sys.exit(main(sys.argv[2:]))
"""


def not_in_image() -> list[str]:
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    (install,) = [arg for op, arg in instructions() if op == "RUN" and "pip install" in arg]
    extras = re.findall(r"\[([a-z,]+)\]", install)[0].split(",")
    image = installed_closure(set().union(*(requirements(pyproject, e) for e in extras))) | {"gradwatch", "pip", "setuptools", "wheel"}
    blocked = sorted(module for module, dists in importlib.metadata.packages_distributions().items()
                     if not module.startswith("_") and not {norm(d) for d in dists} & image)
    assert "torch" in blocked
    return blocked


def test_aggregator_starts_with_the_deployments_environment(tmp_path):
    """The Deployment's env, as is but for a loopback port, a temporary state file and a real token in
    the Secret, and only the image's packages importable: the probe path answers, the ServiceMonitor's
    path serves metrics, and the Secret's token opens the command endpoints."""
    container = containers(one("Deployment", "gradwatch-aggregator"))[0]
    env = aggregator_env(container)
    port = free_port()
    env.update(GRADWATCH_AGGREGATOR_HOST="127.0.0.1", GRADWATCH_AGGREGATOR_PORT=str(port),
               GRADWATCH_AGGREGATOR_STATE=str(tmp_path / "state.sqlite"),
               # unresolvable in-cluster names would cost each round a DNS timeout; a closed port fails fast
               GRADWATCH_AGGREGATOR_PROMETHEUS_URL=f"http://127.0.0.1:{free_port()}",
               GRADWATCH_AGGREGATOR_ALERTMANAGER_URL=f"http://127.0.0.1:{free_port()}")
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-c", IMAGE_LAUNCHER, ",".join(not_in_image()), "aggregator"]
    proc = Child("aggregator", command, tmp_path / "aggregator.log", env=env,
                 ready_url=base + container["readinessProbe"]["httpGet"]["path"]).start()
    try:
        path = one("ServiceMonitor", "gradwatch-aggregator")["spec"]["endpoints"][0]["path"]
        with urllib.request.urlopen(base + path, timeout=5) as r:
            assert b"gradwatch_aggregator_evaluations_total" in r.read()
        request = urllib.request.Request(base + "/api/v1/commands", headers={"Authorization": f"Bearer {env['GRADWATCH_AGGREGATOR_TOKEN']}"})
        with urllib.request.urlopen(request, timeout=5) as r:
            assert r.status == 200
    finally:
        proc.stop()


@pytest.mark.parametrize("token", ["REPLACE-ME-placeholder-not-a-secret", "fifteen-chars!!"])
def test_placeholder_or_short_token_is_refused_at_start_up(token, tmp_path, monkeypatch, capsys):
    """Applying the kustomization with the Secret unchanged must not open halt/scale-LR to every pod:
    `gradwatch aggregator` exits before serving, with one clear reason and without echoing the token."""
    container = containers(one("Deployment", "gradwatch-aggregator"))[0]
    env = container_env(container)
    if token.startswith("REPLACE-ME"):
        assert env["GRADWATCH_AGGREGATOR_TOKEN"] == token  # what deploy/kubernetes ships
    env.update(GRADWATCH_AGGREGATOR_TOKEN=token, GRADWATCH_AGGREGATOR_STATE=str(tmp_path / "state.sqlite"),
               GRADWATCH_AGGREGATOR_PORT=str(free_port()), GRADWATCH_AGGREGATOR_HOST="127.0.0.1")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert gradwatch_main(["aggregator"]) == 2
    err = capsys.readouterr().err
    assert "token" in err and ("placeholder" if token.startswith("REPLACE-ME") else "at least 16") in err, err
    assert token not in err
    assert not (tmp_path / "state.sqlite").exists()


# ---- compose ------------------------------------------------------------------------------------

COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
DEFAULT_PORTS = {"prometheus": 9090, "alertmanager": 9093, "grafana": 3000}  # the images' listen ports


def bind_mounts(service: str) -> Iterator[tuple[Path, PurePosixPath]]:
    for volume in SERVICES[service].get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            yield (DEPLOY / source).resolve(), PurePosixPath(target)


def host_path(service: str, container_path: PurePosixPath) -> Path:
    """Where a path inside a compose container comes from on the host (via its bind mounts)."""
    for source, target in bind_mounts(service):
        if container_path == target or target in container_path.parents:
            return source / container_path.relative_to(target)
    raise AssertionError(f"{service}: nothing mounted at {container_path}")


def mounted_config(service: str, flag: str) -> tuple[Path, PurePosixPath]:
    (arg,) = [a for a in SERVICES[service]["command"] if a.startswith(flag + "=")]
    inside = PurePosixPath(arg.split("=", 1)[1])
    return host_path(service, inside), inside


def aggregator_settings() -> AggregatorSettings:
    env = dict(dockerfile_env())
    env.update({k: re.sub(r"\$\{[^}]*\}", "compose-token-of-32-characters!", v) for k, v in SERVICES["aggregator"]["environment"].items()})
    return settings_from_env(AggregatorSettings, env)


def listen_port(service: str) -> int:
    return aggregator_settings().port if service == "aggregator" else DEFAULT_PORTS[service]


def test_every_bind_mount_exists():
    mounts = [m for s in SERVICES for m in bind_mounts(s)]
    assert len(mounts) == 6
    for source, _ in mounts:
        assert source.exists(), source


def test_compose_configs_pass_promtool_and_amtool():
    prometheus, _ = mounted_config("prometheus", "--config.file")
    alertmanager, _ = mounted_config("alertmanager", "--config.file")
    for proc in (subprocess.run([require("promtool"), "check", "config", str(prometheus)], capture_output=True, text=True),
                 subprocess.run([require("amtool"), "check-config", str(alertmanager)], capture_output=True, text=True)):
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prometheus_finds_its_rule_and_target_files_through_the_mounts():
    config, inside = mounted_config("prometheus", "--config.file")
    prometheus = yaml.safe_load(config.read_text())
    paths = list(prometheus["rule_files"]) + [f for job in prometheus["scrape_configs"]
                                              for sd in job.get("file_sd_configs", []) for f in sd["files"]]
    for relative in paths:
        on_host = host_path("prometheus", inside.parent / relative)
        assert list(on_host.parent.glob(on_host.name)), f"{relative} -> {on_host}: no file"


def referenced_endpoints() -> list[tuple[str, str]]:
    """(service, host:port) every compose-mounted config or the aggregator's environment points at."""
    found = []
    prometheus = yaml.safe_load(mounted_config("prometheus", "--config.file")[0].read_text())
    found += [("prometheus", t) for job in prometheus["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
    alertmanager = yaml.safe_load(mounted_config("alertmanager", "--config.file")[0].read_text())
    found += [("alertmanager", urlsplit(c[key]).netloc) for r in alertmanager["receivers"] for kind, configs in r.items()
              if kind.endswith("_configs") for c in configs for key in ("url", "api_url") if key in c]
    datasources = yaml.safe_load(host_path("grafana", PurePosixPath("/etc/grafana/provisioning/datasources/gradwatch.yml")).read_text())
    found += [("grafana", urlsplit(d["url"]).netloc) for d in datasources["datasources"]]
    settings = aggregator_settings()
    found += [("aggregator", urlsplit(str(u)).netloc) for u in (settings.prometheus_url, settings.alertmanager_url)]
    return found


def test_every_referenced_host_is_a_compose_service_on_its_port():
    endpoints = referenced_endpoints()
    assert len(endpoints) == 5
    for service, endpoint in endpoints:
        host, port = endpoint.rsplit(":", 1)
        extra = [e.split(":")[0] for e in SERVICES[service].get("extra_hosts", [])]
        if host in extra:
            assert int(port) == AGENT_PORT, endpoint
            continue
        assert host in SERVICES, f"{service} refers to {host!r}, not a compose service"
        assert int(port) == listen_port(host), f"{service} -> {endpoint}: {host} listens on {listen_port(host)}"


def test_published_ports_are_the_ones_services_listen_on():
    for name, service in SERVICES.items():
        (published,) = service["ports"]
        host, container = str(published).split(":")
        assert int(container) == listen_port(name), name


def test_alertmanager_reads_its_keys_from_the_secrets_compose_grants_it():
    config = yaml.safe_load(mounted_config("alertmanager", "--config.file")[0].read_text())
    files = {c[k] for r in config["receivers"] for kind, cs in r.items() if kind.endswith("_configs")
             for c in cs for k in c if k.endswith("_file")}
    granted = SERVICES["alertmanager"]["secrets"]
    assert files == {f"/run/secrets/{name}" for name in granted}
    assert set(granted) <= set(COMPOSE["secrets"])


def test_grafana_provisions_the_prometheus_datasource_and_the_dashboards_directory():
    provisioning = host_path("grafana", PurePosixPath("/etc/grafana/provisioning"))
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "gradwatch.yml").read_text())["datasources"]
    assert (datasource["uid"], datasource["type"], urlsplit(datasource["url"]).hostname) == ("gradwatch-prometheus", "prometheus", "prometheus")
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "gradwatch.yml").read_text())["providers"]
    dashboards = host_path("grafana", PurePosixPath(provider["options"]["path"]))
    assert provider["type"] == "file" and dashboards == (REPO / "dashboards" / "json").resolve() and dashboards.is_dir()
    for path in dashboards.glob("*.json"):  # whatever the dashboard generator has written must parse
        json.loads(path.read_text())


# ---- the aggregator image -----------------------------------------------------------------------

DOCKERFILE = DEPLOY / "aggregator.Dockerfile"


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for op, arg in instructions():
        if op == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(arg))
    return env


def requirements(pyproject: dict, extra: str) -> set[str]:
    """Distribution names `pip install .[extra]` installs directly, self-references expanded."""
    names = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in pyproject["project"]["dependencies"]}
    for req in pyproject["project"]["optional-dependencies"][extra]:
        name = re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower()
        if name == pyproject["project"]["name"]:
            for inner in re.search(r"\[(.*)\]", req).group(1).split(","):
                names |= requirements(pyproject, inner.strip())
        else:
            names.add(name)
    return names


def test_image_installs_the_aggregator_extra_without_torch():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    (install,) = [arg for op, arg in instructions() if op == "RUN" and "pip install" in arg]
    extras = set(re.findall(r"\[([a-z,]+)\]", install)[0].split(","))
    assert extras == {"aggregator"} and "torch" not in DOCKERFILE.read_text().replace("no torch", "")
    assert "torch" not in set().union(*(requirements(pyproject, e) for e in extras))
    assert "torch" in requirements(pyproject, "demo")  # the check sees torch through nested extras
    entry = json.loads(dict(instructions())["ENTRYPOINT"])
    assert entry == ["gradwatch", "aggregator"] and "gradwatch" in pyproject["project"]["scripts"]


def test_image_copies_every_source_root_and_the_dockerignore_lets_them_through():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    copied = {src for op, arg in instructions() if op == "COPY" for src in arg.split()[:-1]}
    needed = set(pyproject["tool"]["setuptools"]["package-dir"].values()) | {"pyproject.toml", pyproject["project"]["readme"]}
    assert needed <= copied and all((REPO / src).exists() for src in copied)
    patterns = [p for p in (DEPLOY / "aggregator.Dockerfile.dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    for src in copied:
        included = True
        for pattern in patterns:  # the last matching pattern decides, as in Docker
            if fnmatch.fnmatch(src, pattern.lstrip("!")):
                included = pattern.startswith("!")
        assert included, f"{src} is excluded from the build context"
    assert not any(fnmatch.fnmatch(".venv", p) for p in patterns if p.startswith("!"))


def test_image_compose_and_kubernetes_agree_on_port_user_state_and_name():
    ops = dict(instructions())
    settings = aggregator_settings()
    deployment = one("Deployment", "gradwatch-aggregator")
    (container,) = containers(deployment)
    assert int(ops["EXPOSE"]) == settings.port == container["ports"][0]["containerPort"]
    assert int(ops["USER"]) == deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert settings.state.parent.as_posix() == ops["VOLUME"] == SERVICES["aggregator"]["volumes"][0].split(":")[1]
    assert container["image"] == SERVICES["aggregator"]["image"]
    build = SERVICES["aggregator"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


def test_the_demo_and_the_tests_run_deploys_configs_changed_only_for_loopback(tmp_path):
    """The demo's and the tests' Prometheus and Alertmanager configs are built from the installed copy
    of deploy/'s files: same scrape settings, routes, receivers and inhibitions; only the targets,
    the webhook URLs and the timings differ. amtool and promtool accept the results."""
    from importlib.resources import files

    for name in ("prometheus/prometheus.yml", "alertmanager/alertmanager.yml"):
        shipped = (files("gradwatch.deploy") / name).read_text(encoding="utf-8")
        assert shipped == (DEPLOY / name).read_text(encoding="utf-8"), f"the installed {name} is stale: reinstall"

    deployed = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    loopback = stack.alertmanager_config("http://127.0.0.1:9/")
    assert loopback["inhibit_rules"] == deployed["inhibit_rules"]
    strip = lambda route: {k: v for k, v in route.items() if k not in ("group_wait", "group_interval", "repeat_interval")}  # noqa: E731
    assert strip(loopback["route"]) == strip(deployed["route"])
    assert [r["name"] for r in loopback["receivers"]] == [r["name"] for r in deployed["receivers"]]
    hooks = [h["url"] for r in loopback["receivers"] for h in r.get("webhook_configs", [])]
    assert hooks == ["http://127.0.0.1:9/training-pager", "http://127.0.0.1:9/training-chat"]

    deployed = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    loopback = stack.prometheus_config(RULE_FILE, ["127.0.0.1:1"], "127.0.0.1:2")
    jobs = {c["job_name"]: c for c in deployed["scrape_configs"]}
    for job in loopback["scrape_configs"]:
        assert {k: v for k, v in job.items() if k != "static_configs"} == \
            {k: v for k, v in jobs[job["job_name"]].items() if k != "static_configs"}
    assert [j["job_name"] for j in loopback["scrape_configs"]] == ["gradwatch-agents", "gradwatch-aggregator"]

    (tmp_path / "am.yml").write_text(yaml.safe_dump(stack.alertmanager_config("http://127.0.0.1:9")))
    (tmp_path / "prom.yml").write_text(yaml.safe_dump(loopback))
    for cmd in ([require("amtool"), "check-config", str(tmp_path / "am.yml")],
                [require("promtool"), "check", "config", str(tmp_path / "prom.yml")]):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
