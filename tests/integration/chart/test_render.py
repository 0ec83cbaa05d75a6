"""The chart rendered by the real `helm` (lint, template, schema), without a cluster."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from dexorder.devenv.fixtures_helm import CHART_DIR, Helm
from dexorder.devenv.node_chart import AGENTS_NAMESPACE, NAMESPACE, chart_values
from dexorder.devenv.paths import CRD_DIR, REPO_ROOT
from tests.e2e.test_kind import IMAGES as KIND_IMAGES
from tests.integration.chart.manifests import Manifest, container, documents, env, of_kind, one

ALL_OPTIONS = CHART_DIR / "ci" / "all-options-values.yaml"


def gateway_workload(manifests: list[Manifest]) -> Manifest:
    """The gateway's StatefulSet (its event spool on PVCs, the default) or Deployment."""
    found = [
        manifest
        for manifest in of_kind(manifests, "StatefulSet") + of_kind(manifests, "Deployment")
        if manifest["metadata"]["name"].endswith("gateway")
    ]
    assert len(found) == 1, [manifest["metadata"]["name"] for manifest in found]
    return found[0]


@pytest.fixture(scope="module")
def defaults(helm: Helm) -> list[Manifest]:
    return documents(helm.template("dx", namespace="dexorder").stdout)


@pytest.fixture(scope="module")
def everything(helm: Helm) -> list[Manifest]:
    return documents(helm.template("dx", "-f", str(ALL_OPTIONS), namespace="dexorder").stdout)


@pytest.mark.parametrize("values", [[], ["-f", str(ALL_OPTIONS)]], ids=["defaults", "all-options"])
def test_helm_lint_is_clean(helm: Helm, values: list[str]) -> None:
    result = helm.run(
        "lint",
        str(CHART_DIR),
        "--strict",
        "--namespace=dexorder",
        f"--kube-version={helm.kube_version}",
        *values,
    )
    assert "0 chart(s) failed" in result.stdout


def test_the_crd_is_the_one_in_crds_with_keep(defaults: list[Manifest]) -> None:
    rendered = one(defaults, "CustomResourceDefinition")
    source: dict[str, Any] = yaml.safe_load((CRD_DIR / "useragents.dexorder.ai.yaml").read_text())
    assert rendered["spec"] == source["spec"]
    assert rendered["metadata"]["name"] == source["metadata"]["name"]
    assert rendered["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_crds_install_false_leaves_the_crd_out(helm: Helm) -> None:
    rendered = documents(helm.template("dx", "--set", "crds.install=false").stdout)
    assert of_kind(rendered, "CustomResourceDefinition") == []


def test_no_secret_and_no_secret_value_is_rendered(everything: list[Manifest], helm: Helm) -> None:
    assert of_kind(everything, "Secret") == []
    gateway = container(gateway_workload(everything), "gateway")
    assert gateway["envFrom"] == [{"secretRef": {"name": "dexorder-gateway-secrets"}}]
    assert not {"DATABASE_URL", "REDIS_URL", "ANTHROPIC_API_KEY"} & set(env(gateway))


def test_the_operator_is_two_replicas_electing_a_leader(defaults: list[Manifest]) -> None:
    operator = one(defaults, "Deployment", "-operator")
    assert operator["spec"]["replicas"] == 2
    assert operator["spec"]["strategy"]["type"] == "RollingUpdate"
    settings = env(container(operator, "operator"))
    assert settings["DEXORDER_OPERATOR_LEADER_ELECTION_NAMESPACE"] == "dexorder-agents"
    assert settings["DEXORDER_OPERATOR_NAMESPACES"] == "dexorder-agents"
    assert settings["DEXORDER_OPERATOR_DEFAULT_IMAGE"] == "ghcr.io/dexorder/agent:0.1.0"
    assert settings["DEXORDER_OPERATOR_TIER_CATALOG_PATH"] == "/etc/dexorder/tiers.yaml"


def test_the_gateway_provisions_in_the_agents_namespace(defaults: list[Manifest]) -> None:
    gateway = gateway_workload(defaults)
    assert gateway["spec"]["replicas"] == 2
    settings = env(container(gateway, "gateway"))
    assert settings["DEXORDER_PROVISIONER"] == "kubernetes"
    assert settings["DEXORDER_AGENTS_NAMESPACE"] == "dexorder-agents"
    assert "OLLAMA_URL" not in settings


def test_the_event_spool_is_on_a_pvc_per_replica_by_default(
    helm: Helm, defaults: list[Manifest]
) -> None:
    gateway = gateway_workload(defaults)
    assert gateway["kind"] == "StatefulSet"
    assert gateway["spec"]["podManagementPolicy"] == "Parallel"
    assert gateway["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"
    (claim,) = gateway["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "events"
    assert claim["spec"]["resources"]["requests"]["storage"] == "1024Mi"
    spec = container(gateway, "gateway")
    mounts = {mount["name"]: mount["mountPath"] for mount in spec["volumeMounts"]}
    assert env(spec)["DEXORDER_EVENTS_DIR"] == mounts["events"]
    assert int(env(spec)["DEXORDER_EVENTS_SPOOL_MAX_BYTES"]) == 1024 * 1024 * 1024 * 9 // 10
    volumes = {volume["name"] for volume in gateway["spec"]["template"]["spec"]["volumes"]}
    assert "events" not in volumes  # the claim's, not the pod's

    ephemeral = documents(
        helm.template(
            "dx",
            "--set",
            "gateway.eventSpool.persistent=false",
            "--set",
            "gateway.autoscaling.enabled=true",
            namespace="dexorder",
        ).stdout
    )
    gateway = gateway_workload(ephemeral)
    assert gateway["kind"] == "Deployment"
    assert "volumeClaimTemplates" not in gateway["spec"]
    by_name = {v["name"]: v for v in gateway["spec"]["template"]["spec"]["volumes"]}
    assert by_name["events"]["emptyDir"] == {"sizeLimit": "1024Mi"}
    assert one(ephemeral, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["kind"] == (
        "Deployment"
    )


def test_every_pod_meets_the_restricted_profile(everything: list[Manifest]) -> None:
    for deployment in of_kind(everything, "Deployment") + of_kind(everything, "StatefulSet"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for spec in pod["containers"]:
            context = spec["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"] == {"drop": ["ALL"]}


def test_the_agents_namespace_enforces_restricted_and_survives_uninstall(
    defaults: list[Manifest],
) -> None:
    namespace = one(defaults, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert namespace["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_agents_accept_only_the_gateway_and_reach_only_dns_and_the_allow_list(
    everything: list[Manifest],
) -> None:
    deny = one(everything, "NetworkPolicy", "-default-deny")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    agents = one(everything, "NetworkPolicy", "-agents")
    assert agents["metadata"]["namespace"] == "dexorder-agents-all"
    assert agents["spec"]["podSelector"] == {
        "matchLabels": {"app.kubernetes.io/name": "dexorder-agent"}
    }
    [source] = agents["spec"]["ingress"]
    assert source["ports"] == [{"port": "mcp", "protocol": "TCP"}]
    [peer] = source["from"]
    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "dexorder"}}
    assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    dns, web, single = agents["spec"]["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert web == {
        "to": [{"ipBlock": {"cidr": "203.0.113.0/24", "except": ["203.0.113.128/25"]}}],
        "ports": [{"port": 443, "protocol": "TCP"}],
    }
    assert single == {"to": [{"ipBlock": {"cidr": "198.51.100.7/32"}}]}


def test_network_policies_can_be_turned_off(helm: Helm) -> None:
    rendered = documents(helm.template("dx", "--set", "agents.networkPolicy.enabled=false").stdout)
    assert of_kind(rendered, "NetworkPolicy") == []


@pytest.mark.parametrize(
    ("mode", "extra", "url", "deployments"),
    [
        ("none", [], None, 2),
        ("sidecar", [], "http://127.0.0.1:11434", 2),
        ("deployment", [], "http://dx-dexorder-ollama.dexorder.svc:11434", 3),
        (
            "external",
            ["--set", "ollama.externalUrl=http://ollama.ml:11434"],
            "http://ollama.ml:11434",
            2,
        ),
    ],
)
def test_each_ollama_mode(
    helm: Helm, mode: str, extra: list[str], url: str | None, deployments: int
) -> None:
    rendered = documents(
        helm.template("dx", "--set", f"ollama.mode={mode}", *extra, namespace="dexorder").stdout
    )
    gateway = gateway_workload(rendered)
    assert env(container(gateway, "gateway")).get("OLLAMA_URL") == url
    names = [c["name"] for c in gateway["spec"]["template"]["spec"]["containers"]]
    assert names == (["gateway", "ollama"] if mode == "sidecar" else ["gateway"])
    assert len(of_kind(rendered, "Deployment") + of_kind(rendered, "StatefulSet")) == deployments


def test_the_hpa_replaces_the_fixed_replica_count(everything: list[Manifest]) -> None:
    assert "replicas" not in gateway_workload(everything)["spec"]
    hpa = one(everything, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["kind"] == gateway_workload(everything)["kind"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 20)
    assert one(everything, "Ingress")["spec"]["tls"][0]["secretName"] == "chat-example-com-tls"


def test_a_changed_tier_catalog_rolls_the_pods(helm: Helm, defaults: list[Manifest]) -> None:
    changed = documents(helm.template("dx", "-f", str(ALL_OPTIONS), namespace="dexorder").stdout)
    for find in (lambda m: one(m, "Deployment", "-operator"), gateway_workload):
        before = find(defaults)["spec"]["template"]["metadata"]
        after = find(changed)["spec"]["template"]["metadata"]
        assert before["annotations"]["checksum/config"] != after["annotations"]["checksum/config"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "gateway.replicaz=3"], "additional properties 'replicaz' not allowed"),
        (["--set", "ollama.mode=gpu"], "/ollama/mode"),
        (["--set", "ollama.mode=external"], "/ollama/externalUrl"),
        (["--set", "agents.namespace.name=dexorder"], "must differ from the release namespace"),
        (["--set", "config.tiers=just text"], "config.tiers must be a tier catalog"),
        (
            [
                "--set",
                "gateway.autoscaling.enabled=true",
                "--set",
                "gateway.autoscaling.minReplicas=9",
                "--set",
                "gateway.autoscaling.maxReplicas=3",
            ],
            "minReplicas must not exceed",
        ),
    ],
)
def test_helm_refuses_a_bad_value_with_a_clear_message(
    helm: Helm, args: list[str], message: str
) -> None:
    result = helm.template("dx", *args, namespace="dexorder", check=False)
    assert result.returncode != 0
    assert message in result.stderr


def _documented_values_files() -> list[tuple[str, str]]:
    """Every `# my-values.yaml` block the README and the install guide tell people to use."""
    found = []
    for document in ("README.md", "docs/install.md"):
        text = (REPO_ROOT / document).read_text()
        blocks = re.findall(r"^```yaml\n(# my-values\.yaml\n.*?)^```$", text, re.M | re.S)
        found += [(document, block) for block in blocks]
    return found


DOCUMENTED_VALUES = _documented_values_files()


@pytest.mark.parametrize(
    ("document", "values"), DOCUMENTED_VALUES, ids=[document for document, _ in DOCUMENTED_VALUES]
)
def test_the_documented_minimal_values_install(
    helm: Helm, tmp_path: Path, document: str, values: str
) -> None:
    values_file = tmp_path / "my-values.yaml"
    values_file.write_text(values)
    rendered = documents(helm.template("dexorder", "-f", str(values_file)).stdout)
    gateway = container(gateway_workload(rendered), "gateway")
    assert gateway["image"].startswith("registry.example.com/dexorder/gateway:")
    assert env(gateway)["DEXORDER_JWKS_URL"] == "https://auth.example.com/.well-known/jwks.json"
    assert gateway["envFrom"] == [{"secretRef": {"name": "dexorder-gateway"}}]


def test_both_documents_show_a_minimal_values_file() -> None:
    assert {document for document, _ in DOCUMENTED_VALUES} == {
        "README.md",
        "docs/install.md",
    }


def test_the_kind_suites_values_render(helm: Helm, tmp_path: Path) -> None:
    """The opt-in kind suite cannot run here; its install values are checked here instead."""
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(chart_values(KIND_IMAGES, "http://172.18.0.1:8000/v1")))
    rendered = documents(
        helm.template("dexorder", f"--values={values}", namespace=NAMESPACE).stdout
    )
    gateway = container(gateway_workload(rendered), "gateway")
    assert gateway["image"] == "dexorder/gateway:e2e"
    assert gateway["imagePullPolicy"] == "Never"
    operator = container(one(rendered, "Deployment", "operator"), "operator")
    assert env(operator)["DEXORDER_OPERATOR_DEFAULT_IMAGE"] == "dexorder/agent:e2e"
    assert env(operator)["DEXORDER_OPERATOR_NAMESPACES"] == AGENTS_NAMESPACE
    assert env(operator)["DEXORDER_OPERATOR_IDLE_CHECK_INTERVAL_SECONDS"] == "2"


def test_the_agents_quota_caps_useragents_and_the_gateway_knows_the_cap(
    everything: list[Manifest], defaults: list[Manifest]
) -> None:
    quota = one(everything, "ResourceQuota")
    assert quota["metadata"]["namespace"] == "dexorder-agents-all"
    assert quota["spec"]["hard"] == {
        "count/useragents.dexorder.ai": "500",
        "pods": "500",
        "requests.storage": "500Gi",
    }
    settings = env(container(gateway_workload(everything), "gateway"))
    assert settings["DEXORDER_MAX_AGENTS"] == "500"
    # Off by default: no quota, no cap, and no account enrolled without a license.
    assert not of_kind(defaults, "ResourceQuota")
    default_settings = env(container(gateway_workload(defaults), "gateway"))
    assert "DEXORDER_MAX_AGENTS" not in default_settings
    assert default_settings["DEXORDER_AUTO_ENROLL"] == "false"


def test_the_ingress_routes_neither_probes_nor_metrics(everything: list[Manifest]) -> None:
    ingress = one(everything, "Ingress")
    paths = {
        (path["path"], path["pathType"])
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    }
    assert paths == {
        ("/", "Exact"),
        ("/static/", "Prefix"),
        ("/ws/chat", "Exact"),
        ("/webhook/telegram", "Exact"),
        ("/api/", "Prefix"),
    }
    backends = {
        path["backend"]["service"]["port"]["name"]
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    }
    assert backends == {"http"}
    gateway = container(gateway_workload(everything), "gateway")
    assert env(gateway)["DEXORDER_METRICS_PORT"] == "9090"
    assert {p["name"]: p["containerPort"] for p in gateway["ports"]} == {
        "http": 8080,
        "metrics": 9090,
    }
    service = one(everything, "Service", "gateway")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]


def test_the_gateway_may_list_agents_only_to_count_them_against_a_cap(
    defaults: list[Manifest], everything: list[Manifest]
) -> None:
    def verbs(manifests: list[Manifest]) -> list[str]:
        role = one(manifests, "Role", "gateway")
        [rule] = [r for r in role["rules"] if r["resources"] == ["useragents"]]
        return list(rule["verbs"])

    assert "list" not in verbs(defaults)  # agents.maxAgents 0: no cap, no list
    assert "list" in verbs(everything)  # the capacity check lists them
