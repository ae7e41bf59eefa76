"""deploy/k8s, checked without a cluster: every overlay renders with `kubectl kustomize`, every object
passes the Kubernetes schema of a current version, and the manifests agree with the code (settings,
ports, topics, consumers) and with the operating rules (probes, limits, security, disruption)."""

import base64
import importlib
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]  # no type information
import pytest
import yaml
from packaging.version import Version

from issuance.keys import generate_key
from microcred_events import Topic, dead_letter_topic
from microcred_events.topics import CONFIGS as TOPIC_CONFIGS
from tests.deploy.conftest import ROOT, SDK_VARIABLES, SERVICES, LoadSettings, SettingsSpec

OVERLAYS = ("dev", "prod")
NAMESPACES = {"dev": "microcred-dev", "prod": "microcred"}
# The newest Kubernetes whose schemas kubernetes-validate bundles (no download at test time).
KUBERNETES_VERSION = kubernetes_validate.latest_version()
# Custom resources have no schema in kubernetes-validate (it bundles the built-in API only), and no
# package on the registries this project uses ships the Strimzi or CloudNativePG CRDs: they are
# skipped by the schema test and checked by test_custom_resources_are_well_formed instead.
CUSTOM_RESOURCES = {
    ("kafka.strimzi.io/v1beta2", "Kafka"),
    ("kafka.strimzi.io/v1beta2", "KafkaNodePool"),
    ("kafka.strimzi.io/v1beta2", "KafkaTopic"),
    ("postgresql.cnpg.io/v1", "Cluster"),
    ("postgresql.cnpg.io/v1", "Database"),
}
# Secrets the operator creates in every environment, even dev (deploy/README.md, "Secrets").
OPERATOR_SECRETS = {"issuance-signing-keys"}
KEYS_MOUNT = "/etc/microcred/issuer-keys"
ALL_INTERFACES = "0.0.0.0"  # noqa: S104  (what a container must listen on)
TMP = "/tmp"  # noqa: S108  (an emptyDir, per pod)

Object = dict[str, Any]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Object]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is needed to render deploy/k8s (kubectl kustomize)")
    overlays = {}
    for overlay in OVERLAYS:
        result = subprocess.run(  # noqa: S603  (kubectl on our own files)
            [kubectl, "kustomize", str(ROOT / "deploy" / "k8s" / "overlays" / overlay)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, f"overlays/{overlay} does not build:\n{result.stderr}"
        overlays[overlay] = [document for document in yaml.safe_load_all(result.stdout) if document]
    return overlays


def _of_kind(objects: list[Object], kind: str) -> dict[str, Object]:
    return {item["metadata"]["name"]: item for item in objects if item["kind"] == kind}


def _named(objects: list[Object], kind: str, name: str) -> Object:
    """A generated object (ConfigMap, Secret) by its name before kustomize added the hash."""
    (found,) = (
        item
        for item in objects
        if item["kind"] == kind
        and (item["metadata"]["name"] == name or item["metadata"]["name"].rsplit("-", 1)[0] == name)
    )
    return found


def _pod_specs(objects: list[Object]) -> Iterator[tuple[str, Object]]:
    for name, deployment in _of_kind(objects, "Deployment").items():
        yield name, deployment["spec"]["template"]["spec"]


def _containers(pod: Object) -> list[Object]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def _service_container(objects: list[Object], service: str) -> Object:
    (container,) = _of_kind(objects, "Deployment")[service]["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def environment(objects: list[Object], container: Object) -> dict[str, str]:
    """The variables a container gets: ConfigMap values, and `secret:<name>/<key>` for Secrets."""
    values: dict[str, str] = {}
    for source in container.get("envFrom", []):
        config_map = _of_kind(objects, "ConfigMap")[source["configMapRef"]["name"]]
        values.update(config_map["data"])
    for variable in container.get("env", []):
        if "value" in variable:
            values[variable["name"]] = variable["value"]
        else:
            reference = variable["valueFrom"]["secretKeyRef"]
            values[variable["name"]] = f"secret:{reference['name']}/{reference['key']}"
    return values


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_builds_into_its_namespace(rendered: dict[str, list[Object]], overlay: str) -> None:
    objects = rendered[overlay]
    kinds = {item["kind"] for item in objects}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "NetworkPolicy", "KafkaTopic"} <= kinds
    for item in objects:
        if item["kind"] != "Namespace":
            assert item["metadata"]["namespace"] == NAMESPACES[overlay], item["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_passes_the_kubernetes_schema(rendered: dict[str, list[Object]], overlay: str) -> None:
    assert Version(KUBERNETES_VERSION) >= Version("1.32")
    errors = []
    for item in rendered[overlay]:
        if (item["apiVersion"], item["kind"]) in CUSTOM_RESOURCES:
            continue
        try:
            # Strict: a field the schema does not know (a typo) is an error, not ignored.
            kubernetes_validate.validate(item, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = "/".join(map(str, error.path))
            errors.append(f"{item['kind']}/{item['metadata']['name']}: {path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            errors.append(f"{item['kind']}/{item['metadata']['name']}: {error.message}")
    assert not errors, "\n".join(errors)


def test_the_schema_check_would_catch_a_misspelt_field(rendered: dict[str, list[Object]]) -> None:
    deployment = _of_kind(rendered["prod"], "Deployment")["catalog"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    broken_container = {**container, "livenesProbe": container["livenessProbe"]}
    broken_pod = {**deployment["spec"]["template"]["spec"], "containers": [broken_container]}
    broken = {**deployment, "spec": {**deployment["spec"], "template": {"spec": broken_pod}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_are_well_formed(rendered: dict[str, list[Object]], overlay: str) -> None:
    objects = rendered[overlay]
    kafka_clusters = set(_of_kind(objects, "Kafka"))
    for name, topic in _of_kind(objects, "KafkaTopic").items():
        assert topic["apiVersion"] == "kafka.strimzi.io/v1beta2"
        assert set(topic["spec"]) == {"topicName", "partitions", "replicas", "config"}, name
        assert topic["spec"]["topicName"] == name
        assert isinstance(topic["spec"]["partitions"], int)
        assert topic["spec"]["partitions"] >= 1
        replicas, min_insync = topic["spec"]["replicas"], topic["spec"]["config"]["min.insync.replicas"]
        assert 1 <= min_insync <= replicas, f"{name}: acks=all needs min.insync.replicas <= replicas"
        assert replicas == 1 or min_insync < replicas, f"{name}: one broker down would stop writes"
        cluster = topic["metadata"]["labels"]["strimzi.io/cluster"]
        if kafka_clusters:
            assert cluster in kafka_clusters, f"{name}: no Kafka named {cluster} in overlays/{overlay}"
    for name, pool in _of_kind(objects, "KafkaNodePool").items():
        assert pool["metadata"]["labels"]["strimzi.io/cluster"] in kafka_clusters, name
        assert set(pool["spec"]["roles"]) <= {"broker", "controller"}
    for name, kafka in _of_kind(objects, "Kafka").items():
        assert kafka["metadata"]["annotations"]["strimzi.io/node-pools"] == "enabled", name
        assert "topicOperator" in kafka["spec"]["entityOperator"]
    clusters = _of_kind(objects, "Cluster")
    secrets = _of_kind(objects, "Secret")
    for name, cluster in clusters.items():
        for role in cluster["spec"]["managed"]["roles"]:
            secret = secrets[role["passwordSecret"]["name"]]
            assert secret["type"] == "kubernetes.io/basic-auth"
            assert base64.b64decode(secret["data"]["username"]).decode() == role["name"], name
    for name, database in _of_kind(objects, "Database").items():
        assert database["spec"]["cluster"]["name"] in clusters, name
        assert database["spec"]["owner"] == database["spec"]["name"], "each service owns its database"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_topic_of_the_contract_is_declared(rendered: dict[str, list[Object]], overlay: str) -> None:
    declared = {topic["spec"]["topicName"] for topic in _of_kind(rendered[overlay], "KafkaTopic").values()}
    expected = {str(topic) for topic in Topic} | {dead_letter_topic(service) for service in SERVICES}
    assert declared == expected


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_topics_carry_the_settings_the_services_create_them_with(
    rendered: dict[str, list[Object]], overlay: str
) -> None:
    """E.g. the partner topic's LogAppendTime, which enrollment's freshness check relies on."""
    declared = {
        topic["spec"]["topicName"]: topic["spec"]
        for topic in _of_kind(rendered[overlay], "KafkaTopic").values()
    }
    assert TOPIC_CONFIGS
    for topic, config in TOPIC_CONFIGS.items():
        assert config.items() <= declared[topic]["config"].items(), topic


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_partitions_cover_every_consumer_replica(rendered: dict[str, list[Object]], overlay: str) -> None:
    objects = rendered[overlay]
    topics = {topic["spec"]["topicName"]: topic["spec"] for topic in _of_kind(objects, "KafkaTopic").values()}
    autoscalers = _of_kind(objects, "HorizontalPodAutoscaler")
    for service in SERVICES:
        # What the service subscribes to, from its own code, not from a list kept by hand.
        consumed = importlib.import_module(f"{service}.main").service.subscriptions.topics
        most = autoscalers[service]["spec"]["maxReplicas"]
        for topic in consumed:
            assert topics[topic]["partitions"] >= most, (
                f"{topic} has {topics[topic]['partitions']} partitions, {service} scales to {most}: "
                "the extra consumers would sit idle"
            )
    common = _named(objects, "ConfigMap", "microcred-common")["data"]
    for topic in Topic:
        assert topics[topic]["partitions"] == int(common["KAFKA_TOPIC_PARTITIONS"])
        assert topics[topic]["replicas"] == int(common["KAFKA_TOPIC_REPLICATION"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_is_probed_limited_and_unprivileged(
    rendered: dict[str, list[Object]], overlay: str
) -> None:
    for name, pod in _pod_specs(rendered[overlay]):
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["enableServiceLinks"] is False, name
        empty_dirs = {volume["name"] for volume in pod.get("volumes", []) if "emptyDir" in volume}
        for container in _containers(pod):
            where = f"{name}/{container['name']}"
            for bound in ("requests", "limits"):
                assert set(container["resources"][bound]) >= {"cpu", "memory"}, f"{where}: {bound}"
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
            assert mounts.get(TMP) in empty_dirs, f"{where}: a writable /tmp on a read-only root"
        for container in pod["containers"]:
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert "httpGet" in container[probe], f"{name}: {probe}"
        if name in SERVICES:
            (container,) = pod["containers"]
            assert container["startupProbe"]["httpGet"]["path"] == "/health/live"
            assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
            assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_outlasts_the_drain(
    rendered: dict[str, list[Object]], settings_specs: Mapping[str, SettingsSpec], overlay: str
) -> None:
    objects = rendered[overlay]
    for service in SERVICES:
        pod = _of_kind(objects, "Deployment")[service]["spec"]["template"]["spec"]
        container = _service_container(objects, service)
        given = environment(objects, container)
        grace = float(given["SHUTDOWN_GRACE_SECONDS"])
        pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
        # Background workers (notifications' deliveries) get their own drain on top.
        fields = settings_specs[service].settings_class.model_fields
        workers = 0.0
        if "delivery_drain_seconds" in fields:
            workers = float(given.get("DELIVERY_DRAIN_SECONDS", fields["delivery_drain_seconds"].default))
        # The preStop pause, open HTTP requests and in-flight messages (each up to the grace time).
        drain = pause + 2 * grace + workers
        assert pod["terminationGracePeriodSeconds"] > drain, (
            f"{service}: SIGKILL after {pod['terminationGracePeriodSeconds']} s, the drain may take {drain} s"
        )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_service_has_an_autoscaler_and_a_disruption_budget(
    rendered: dict[str, list[Object]], overlay: str
) -> None:
    objects = rendered[overlay]
    deployments = _of_kind(objects, "Deployment")
    autoscalers = _of_kind(objects, "HorizontalPodAutoscaler")
    budgets = _of_kind(objects, "PodDisruptionBudget")
    for service in SERVICES:
        assert "replicas" not in deployments[service]["spec"], f"{service}: the autoscaler owns the count"
        autoscaler = autoscalers[service]
        assert autoscaler["apiVersion"] == "autoscaling/v2"
        assert autoscaler["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": service,
        }
        assert 1 <= autoscaler["spec"]["minReplicas"] <= autoscaler["spec"]["maxReplicas"]
        budget = budgets[service]
        assert budget["apiVersion"] == "policy/v1"
        labels = deployments[service]["spec"]["template"]["metadata"]["labels"]
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
        # maxUnavailable, not minAvailable: with one replica (dev) a drain can still proceed.
        assert budget["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_service_gets_the_settings_it_reads(
    rendered: dict[str, list[Object]], settings_specs: Mapping[str, SettingsSpec], overlay: str, service: str
) -> None:
    objects = rendered[overlay]
    spec = settings_specs[service]
    pod = _of_kind(objects, "Deployment")[service]["spec"]["template"]["spec"]
    container = _service_container(objects, service)
    given = environment(objects, container)
    assert not spec.required - set(given), (
        f"{service} cannot start without {sorted(spec.required - set(given))}"
    )
    unknown = set(given) - spec.reads - SDK_VARIABLES
    assert not unknown, f"{service} reads no {sorted(unknown)} (a typo?)"
    assert container["args"] == ["python", "-m", service]
    assert given["HTTP_HOST"] == ALL_INTERFACES
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": int(given["HTTP_PORT"]), "metrics": int(given["METRICS_PORT"])}
    assert int(given["HTTP_PORT"]) == spec.default_port
    (kubernetes_service,) = (
        s for s in _of_kind(objects, "Service").values() if s["metadata"]["name"] == service
    )
    assert kubernetes_service["spec"]["ports"][0]["targetPort"] == "http"
    assert kubernetes_service["spec"]["selector"].items() <= pod_labels(objects, service).items()
    (migrate,) = pod["initContainers"]
    assert migrate["args"] == ["python", "/app/migrate.py", service]
    assert migrate["image"] == container["image"]
    assert (
        environment(objects, migrate)["DATABASE_URL"]
        == given["DATABASE_URL"]
        == f"secret:{_secret_name(objects, f'{service}-database')}/DATABASE_URL"
    )
    if "ISSUER_KEYS_DIR" in given:
        assert given["ISSUER_KEYS_DIR"] == KEYS_MOUNT
        (mount,) = (m for m in container["volumeMounts"] if m["mountPath"] == KEYS_MOUNT)
        (volume,) = (v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["secretName"] in OPERATOR_SECRETS
        assert mount["readOnly"] is True


def pod_labels(objects: list[Object], service: str) -> dict[str, str]:
    labels: dict[str, str] = _of_kind(objects, "Deployment")[service]["spec"]["template"]["metadata"][
        "labels"
    ]
    return labels


def _secret_name(objects: list[Object], name: str) -> str:
    """The rendered name of a Secret: generated ones carry a hash, operator-created ones do not."""
    generated = [
        s["metadata"]["name"]
        for s in objects
        if s["kind"] == "Secret" and s["metadata"]["name"].rsplit("-", 1)[0] == name
    ]
    return generated[0] if generated else name


@pytest.mark.parametrize("service", SERVICES)
def test_dev_services_start_with_the_dev_overlay(
    rendered: dict[str, list[Object]], load_settings: LoadSettings, service: str, tmp_path: Path
) -> None:
    objects = rendered["dev"]
    secrets = _of_kind(objects, "Secret")
    given = {}
    for variable, value in environment(objects, _service_container(objects, service)).items():
        if value.startswith("secret:"):
            name, _, key = value.removeprefix("secret:").partition("/")
            if name not in secrets:
                continue  # an optional reference (test_dev_secret_references_resolve): unset
            given[variable] = base64.b64decode(secrets[name]["data"][key]).decode()
        else:
            given[variable] = value
    if "ISSUER_KEYS_DIR" in given:
        # The operator's Secret, as the README says to make it.
        generate_key(tmp_path)
        given["ISSUER_KEYS_DIR"] = str(tmp_path)
    settings = load_settings(service, given)
    url = urlsplit(str(settings.database_url))
    role = _named(objects, "Secret", f"{service}-db-role")["data"]
    assert url.password == base64.b64decode(role["password"]).decode(), "the role CloudNativePG creates"
    assert url.hostname == "microcred-pg-rw", "CloudNativePG's read-write Service"


def test_dev_secret_references_resolve(rendered: dict[str, list[Object]]) -> None:
    objects = rendered["dev"]
    secrets = _of_kind(objects, "Secret")
    for name, pod in _pod_specs(objects):
        for container in _containers(pod):
            for variable in container.get("env", []):
                reference = variable.get("valueFrom", {}).get("secretKeyRef")
                if reference and not reference.get("optional"):
                    assert reference["key"] in secrets[reference["name"]]["data"], (
                        f"{name}: {variable['name']}"
                    )
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in OPERATOR_SECRETS | set(secrets), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_deny_by_default_and_open_only_ports(
    rendered: dict[str, list[Object]], overlay: str
) -> None:
    objects = rendered[overlay]
    policies = _of_kind(objects, "NetworkPolicy")
    deny = policies["microcred-default-deny"]["spec"]
    assert deny["podSelector"] == {"matchLabels": {"app.kubernetes.io/part-of": "microcred"}}
    assert set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny
    assert "egress" not in deny
    pods = [
        deployment["spec"]["template"]["metadata"]["labels"]
        for deployment in _of_kind(objects, "Deployment").values()
    ]
    for labels in pods:
        assert labels["app.kubernetes.io/part-of"] == "microcred", "every pod is under the default deny"
    for name, policy in policies.items():
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        assert any(selector.items() <= labels.items() for labels in pods), f"{name} selects no pod"
        for rule in policy["spec"].get("egress", []) + policy["spec"].get("ingress", []):
            assert rule.get("ports"), f"{name}: a rule without ports opens every port"
    for service in SERVICES:
        ingress = policies[f"{service}-ingress"]["spec"]
        assert ingress["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": service}
        opened = {
            _namespace_label(rule): [port["port"] for port in rule["ports"]] for rule in ingress["ingress"]
        }
        assert opened == {"microcred.org/ingress": ["http"], "microcred.org/monitoring": ["metrics"]}


def _namespace_label(rule: Object) -> str:
    """The one namespace label an ingress rule admits its clients by."""
    (source,) = rule["from"]
    (label,) = source["namespaceSelector"]["matchLabels"]
    assert isinstance(label, str)
    return label


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_metrics_are_scraped_on_a_port_of_their_own_that_the_service_does_not_expose(
    rendered: dict[str, list[Object]], overlay: str, service: str
) -> None:
    objects = rendered[overlay]
    given = environment(objects, _service_container(objects, service))
    assert given["METRICS_PORT"] != given["HTTP_PORT"]
    annotations = _of_kind(objects, "Deployment")[service]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == given["METRICS_PORT"]
    assert annotations["prometheus.io/path"] == "/metrics"
    (kubernetes_service,) = (
        s for s in _of_kind(objects, "Service").values() if s["metadata"]["name"] == service
    )
    assert [port["targetPort"] for port in kubernetes_service["spec"]["ports"]] == ["http"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_overlay_names_the_image(rendered: dict[str, list[Object]], overlay: str) -> None:
    images = {
        container["image"]
        for _, pod in _pod_specs(rendered[overlay])
        for container in _containers(pod)
        if not container["image"].startswith("otel/")
    }
    assert images == (
        {"microcred:local"} if overlay == "dev" else {"registry.example.org/microcred/microcred:0.1.0"}
    )
