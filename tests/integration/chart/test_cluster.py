"""The chart on the real local control plane (API server with RBAC, kwok for pods).

What runs here: `helm template` with the defaults and with every option on, checked by the
API server itself (`kubectl apply --dry-run=server`, with Pod Security warnings turned
on); `helm install`, `upgrade` and `uninstall`; and the RBAC the chart grants, asked of
the API server with `kubectl auth can-i` as each service account.

kwok's pods run no containers, so the operator the chart installs cannot reconcile
anything itself. Instead the real `dexorder-operator` runs out of the cluster with what its
pod would have: a token of the chart's operator service account (TokenRequest API), and the
settings and tier catalog read from the installed Deployment and ConfigMap; the gateway's
KubernetesProvisioner likewise runs with a token of the gateway's account. A UserAgent
applied with kubectl, and one the provisioner creates, become Ready through them: the
chart's RBAC is enough for the real code, and `kubectl auth can-i` shows it is no more.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from dexorder.adapters.kubernetes import KubeClient, load_kubeconfig
from dexorder.core.naming import user_agent_name
from dexorder.core.tiers import parse_tier_catalog
from dexorder.devenv.fixtures_helm import CHART_DIR, Helm
from dexorder.devenv.fixtures_kube import Kubectl, OperatorProcess
from dexorder.devenv.kubernetes import ControlPlane
from dexorder.devenv.paths import CRD_DIR, TIER_CATALOG
from dexorder.gateway.agents.provisioning.base import Stage
from dexorder.gateway.agents.provisioning.kubernetes import KubernetesProvisioner
from dexorder.gateway.pure.licenses import License, resolve_license

CRD = "customresourcedefinition/useragents.dexorder.ai"
RESTRICTED = [
    "pod-security.kubernetes.io/enforce=restricted",
    "pod-security.kubernetes.io/warn=restricted",
]


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def cluster_helm(helm: Helm, control_plane: ControlPlane) -> Helm:
    return helm.against(control_plane.kubeconfig)


@pytest.fixture(scope="module")
def release_namespace(kubectl: Kubectl) -> Iterator[str]:
    """The release's namespace, enforcing Pod Security "restricted" like the agents'."""
    name = _unique("dx")
    kubectl.run("create", "namespace", name)
    kubectl.run("label", "namespace", name, *RESTRICTED)
    yield name
    kubectl.run("delete", "namespace", name, "--wait=false", check=False)


def _adopt_existing_crd(kubectl: Kubectl, release: str, namespace: str) -> None:
    """Another suite may have applied crds/ with kubectl; Helm adopts an object only when
    it carries the release's ownership metadata (the documented way to hand it to Helm)."""
    if kubectl.run("get", CRD, check=False).returncode != 0:
        return
    kubectl.run("label", CRD, "app.kubernetes.io/managed-by=Helm", "--overwrite")
    kubectl.run(
        "annotate",
        CRD,
        f"meta.helm.sh/release-name={release}",
        f"meta.helm.sh/release-namespace={namespace}",
        "--overwrite",
    )


def _hand_back_crd(kubectl: Kubectl) -> None:
    """Leave the kept CRD as the other suites' `kubectl apply --server-side -f crds/` expects
    it: without Helm's ownership, and with its fields owned by kubectl's field manager
    (otherwise their apply reports a conflict with Helm's manager on .spec.versions)."""
    kubectl.run(
        "label",
        CRD,
        "app.kubernetes.io/managed-by-",
        "helm.sh/chart-",
        "app.kubernetes.io/part-of-",
        "app.kubernetes.io/version-",
        check=False,
    )
    kubectl.run(
        "annotate",
        CRD,
        "meta.helm.sh/release-name-",
        "meta.helm.sh/release-namespace-",
        "helm.sh/resource-policy-",
        check=False,
    )
    kubectl.run("apply", "--server-side", "--force-conflicts", "-f", str(CRD_DIR))


# --- rendered manifests, validated by the API server --------------------------------


@pytest.mark.parametrize(
    "values",
    [[], ["-f", str(CHART_DIR / "ci" / "all-options-values.yaml")]],
    ids=["defaults", "all-options"],
)
def test_the_rendered_chart_is_accepted_by_the_api_server(
    helm: Helm, kubectl: Kubectl, release_namespace: str, values: list[str]
) -> None:
    agents = _unique("dxa")
    # A dry run cannot create a namespace and then fill it: create it for real.
    kubectl.run("create", "namespace", agents)
    kubectl.run("label", "namespace", agents, *RESTRICTED)
    try:
        rendered = helm.template(
            "dry",
            *values,
            "--set",
            f"agents.namespace.name={agents}",
            namespace=release_namespace,
        ).stdout
        result = kubectl.run(
            "apply",
            "--server-side",
            "--force-conflicts",
            "--dry-run=server",
            "--field-manager=dexorder-chart-test",
            "-f",
            "-",
            input=rendered,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        # Pod Security "warn" names any pod template that "restricted" would refuse.
        assert "Warning" not in result.stderr, result.stderr
        applied = [line for line in result.stdout.splitlines() if "(server dry run)" in line]
        assert len(applied) == rendered.count("\nkind: ")
    finally:
        kubectl.run("delete", "namespace", agents, "--wait=false", check=False)


# --- install, RBAC, upgrade, uninstall ----------------------------------------------


@dataclass(frozen=True)
class Release:
    name: str
    namespace: str
    agents: str

    def account(self, component: str) -> str:
        return f"{self.name}-dexorder-{component}"


@pytest.fixture(scope="module")
def release(cluster_helm: Helm, kubectl: Kubectl, release_namespace: str) -> Iterator[Release]:
    installed = Release("dx", release_namespace, _unique("dxa"))
    _adopt_existing_crd(kubectl, installed.name, installed.namespace)
    cluster_helm.run(
        "install",
        installed.name,
        str(CHART_DIR),
        f"--namespace={installed.namespace}",
        "--set",
        f"agents.namespace.name={installed.agents}",
        "--set",
        "ollama.mode=deployment",
        "--wait",
        "--timeout=150s",
    )
    yield installed
    cluster_helm.run(
        "uninstall", installed.name, f"--namespace={installed.namespace}", "--wait", check=False
    )
    kubectl.run("delete", "namespace", installed.agents, "--wait=false", check=False)
    _hand_back_crd(kubectl)


def _deployments(kubectl: Kubectl, namespace: str) -> dict[str, Any]:
    """Deployments and StatefulSets (the gateway is one, with its spool's claims) by name."""
    listed = json.loads(
        kubectl.run("get", "deployments,statefulsets", "-n", namespace, "-o", "json").stdout
    )
    return {item["metadata"]["name"]: item for item in listed["items"]}


def test_install_makes_every_deployment_available(kubectl: Kubectl, release: Release) -> None:
    deployments = _deployments(kubectl, release.namespace)
    assert sorted(deployments) == [
        "dx-dexorder-gateway",
        "dx-dexorder-ollama",
        "dx-dexorder-operator",
    ]
    for name, deployment in deployments.items():
        assert deployment["status"].get("availableReplicas") == deployment["spec"]["replicas"], name
    assert deployments["dx-dexorder-operator"]["spec"]["replicas"] == 2


def test_the_agents_namespace_enforces_restricted(kubectl: Kubectl, release: Release) -> None:
    namespace = json.loads(kubectl.run("get", "namespace", release.agents, "-o", "json").stdout)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    privileged = kubectl.run(
        "run",
        "intruder",
        f"-n={release.agents}",
        "--image=busybox",
        "--restart=Never",
        "--overrides",
        json.dumps(
            {
                "spec": {
                    "containers": [
                        {
                            "name": "intruder",
                            "image": "busybox",
                            "securityContext": {"privileged": True},
                        }
                    ]
                }
            }
        ),
        check=False,
    )
    assert privileged.returncode != 0
    assert "violates PodSecurity" in privileged.stderr


def _can(
    kubectl: Kubectl,
    account: str,
    account_namespace: str,
    verb: str,
    resource: str,
    namespace: str | None,
) -> bool:
    resource, _, subresource = resource.partition("/")
    args = [
        "auth",
        "can-i",
        verb,
        resource,
        *([f"--subresource={subresource}"] if subresource else []),
        f"--as=system:serviceaccount:{account_namespace}:{account}",
        # What a real token of that account carries.
        "--as-group=system:serviceaccounts",
        f"--as-group=system:serviceaccounts:{account_namespace}",
        "--as-group=system:authenticated",
    ]
    args += [f"--namespace={namespace}"] if namespace else ["--all-namespaces"]
    result = kubectl.run(*args, check=False)
    answer = result.stdout.strip()
    assert answer in ("yes", "no"), result.stderr
    return answer == "yes"


# (verb, resource, where): where is "agents", "release", "default", or "cluster".
OPERATOR_MAY = [
    *[(verb, "useragents.dexorder.ai", "agents") for verb in ("get", "list", "watch", "patch")],
    ("patch", "useragents.dexorder.ai/status", "agents"),
    ("update", "useragents.dexorder.ai/finalizers", "agents"),
    *[(verb, "deployments.apps", "agents") for verb in ("get", "list", "watch", "create", "patch")],
    *[(verb, "services", "agents") for verb in ("get", "list", "watch", "create", "patch")],
    *[(verb, "persistentvolumeclaims", "agents") for verb in ("create", "patch", "delete")],
    ("create", "secrets", "agents"),
    *[(verb, "pods", "agents") for verb in ("get", "list", "watch")],
    ("create", "events", "agents"),
    *[(verb, "leases.coordination.k8s.io", "agents") for verb in ("get", "create", "update")],
]
OPERATOR_MAY_NOT = [
    ("get", "secrets", "agents"),
    ("create", "events.events.k8s.io", "agents"),
    ("list", "secrets", "agents"),
    ("update", "secrets", "agents"),
    ("delete", "deployments.apps", "agents"),
    ("create", "pods", "agents"),
    ("create", "pods/exec", "agents"),
    ("get", "secrets", "release"),
    ("create", "deployments.apps", "default"),
    ("get", "useragents.dexorder.ai", "default"),
    ("get", "secrets", "cluster"),
    ("patch", "customresourcedefinitions.apiextensions.k8s.io", "cluster"),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", "cluster"),
    ("create", "rolebindings.rbac.authorization.k8s.io", "agents"),
    ("delete", "namespaces", "cluster"),
    # Nothing cluster-wide: no discovery of namespaces or CRDs.
    ("list", "namespaces", "cluster"),
    ("watch", "customresourcedefinitions.apiextensions.k8s.io", "cluster"),
]
GATEWAY_MAY = [
    *[(verb, "useragents.dexorder.ai", "agents") for verb in ("get", "watch", "create", "patch")],
    ("get", "secrets", "agents"),
]
GATEWAY_MAY_NOT = [
    ("list", "useragents.dexorder.ai", "agents"),
    ("delete", "useragents.dexorder.ai", "agents"),
    ("patch", "useragents.dexorder.ai/status", "agents"),
    ("list", "secrets", "agents"),
    ("create", "secrets", "agents"),
    ("delete", "deployments.apps", "agents"),
    ("patch", "deployments.apps", "agents"),
    ("get", "pods", "agents"),
    ("create", "pods/exec", "agents"),
    ("get", "secrets", "release"),
    ("get", "secrets", "default"),
    ("get", "secrets", "kube-system"),
    ("create", "useragents.dexorder.ai", "default"),
    ("list", "namespaces", "cluster"),
    ("create", "rolebindings.rbac.authorization.k8s.io", "agents"),
]


def _where(release: Release, where: str) -> str | None:
    return {"agents": release.agents, "release": release.namespace, "cluster": None}.get(
        where, where
    )


@pytest.mark.parametrize(
    ("component", "verb", "resource", "where", "allowed"),
    [
        *[("operator", *check, True) for check in OPERATOR_MAY],
        *[("operator", *check, False) for check in OPERATOR_MAY_NOT],
        *[("gateway", *check, True) for check in GATEWAY_MAY],
        *[("gateway", *check, False) for check in GATEWAY_MAY_NOT],
    ],
    ids=lambda value: str(value),
)
def test_service_account_rights(
    kubectl: Kubectl,
    release: Release,
    component: str,
    verb: str,
    resource: str,
    where: str,
    allowed: bool,
) -> None:
    assert (
        _can(
            kubectl,
            release.account(component),
            release.namespace,
            verb,
            resource,
            _where(release, where),
        )
        is allowed
    )


def test_an_agent_has_no_rights_at_all(kubectl: Kubectl, release: Release) -> None:
    # Agent pods run as the agents namespace's default account (with no token mounted).
    listed = kubectl.run(
        "auth",
        "can-i",
        "--list",
        f"--namespace={release.agents}",
        f"--as=system:serviceaccount:{release.agents}:default",
        "--as-group=system:serviceaccounts",
        f"--as-group=system:serviceaccounts:{release.agents}",
        "--as-group=system:authenticated",
    ).stdout.splitlines()[1:]
    resources = {line.split()[0] for line in listed if line.split() and not line.startswith(" ")}
    # What every authenticated identity may do: ask who it is and what it may do.
    assert resources <= {
        "selfsubjectreviews.authentication.k8s.io",
        "selfsubjectaccessreviews.authorization.k8s.io",
        "selfsubjectrulesreviews.authorization.k8s.io",
        "[]",
    }, listed
    for verb, resource in [
        ("*", "*"),
        ("get", "secrets"),
        ("list", "useragents.dexorder.ai"),
        ("get", "pods"),
        ("create", "pods"),
    ]:
        assert not _can(kubectl, "default", release.agents, verb, resource, release.agents)


# --- the installed operator's and gateway's rights, exercised by the real code ------------
#
# kwok's pods run nothing, so the operator and the gateway's provisioner run here, out of
# the cluster, with what the installed pods would have: a token of the chart's own service
# account (minted with the TokenRequest API, as the kubelet does for a projected token),
# and the operator's settings and tier catalog read from the installed Deployment and
# ConfigMap. A right the chart forgot fails the reconcile or the provisioning.


def _service_account_kubeconfig(
    kubectl: Kubectl, control_plane: ControlPlane, release: Release, component: str, path: Path
) -> Path:
    token = kubectl.run(
        "create", "token", release.account(component), f"--namespace={release.namespace}"
    ).stdout.strip()
    admin = yaml.safe_load(control_plane.kubeconfig.read_text())
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": admin["clusters"],
                "users": [{"name": component, "user": {"token": token}}],
                "contexts": [
                    {
                        "name": component,
                        "context": {"cluster": admin["clusters"][0]["name"], "user": component},
                    }
                ],
                "current-context": component,
            }
        )
    )
    path.chmod(0o600)
    return path


def _installed_operator_settings(
    kubectl: Kubectl, release: Release, directory: Path
) -> dict[str, str]:
    """The DEXORDER_OPERATOR_* environment the chart gives the operator's container, with
    the tier catalog copied out of its ConfigMap; only the listening ports are changed."""
    deployment = json.loads(
        kubectl.run(
            "get", "deployment", release.account("operator"), f"-n={release.namespace}", "-o=json"
        ).stdout
    )
    pod = deployment["spec"]["template"]["spec"]
    env = {item["name"]: item["value"] for item in pod["containers"][0]["env"] if "value" in item}
    config_map = next(v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v)
    tiers = kubectl.run(
        "get",
        "configmap",
        config_map,
        f"-n={release.namespace}",
        r"-o=jsonpath={.data.tiers\.yaml}",
    ).stdout
    catalog = directory / "tiers.yaml"
    catalog.write_text(tiers)
    assert env["DEXORDER_OPERATOR_TIER_CATALOG_PATH"] == "/etc/dexorder/tiers.yaml"
    env["DEXORDER_OPERATOR_TIER_CATALOG_PATH"] = str(catalog)
    for port in ("METRICS_HOST", "METRICS_PORT", "HEALTH_PORT"):
        env.pop(f"DEXORDER_OPERATOR_{port}")
    return env


@pytest.fixture
def operator_as_its_account(
    kubectl: Kubectl, control_plane: ControlPlane, release: Release, tmp_path: Path
) -> Iterator[OperatorProcess]:
    settings = _installed_operator_settings(kubectl, release, tmp_path)
    assert settings["DEXORDER_OPERATOR_NAMESPACES"] == release.agents
    kubeconfig = _service_account_kubeconfig(
        kubectl, control_plane, release, "operator", tmp_path / "operator.kubeconfig"
    )
    operator = OperatorProcess(kubeconfig, tmp_path, settings)
    operator.start()
    try:
        yield operator
    finally:
        operator.stop()


async def test_the_installed_operator_and_gateway_accounts_bring_an_agent_up(
    kubectl: Kubectl,
    control_plane: ControlPlane,
    release: Release,
    operator_as_its_account: OperatorProcess,
    tmp_path: Path,
) -> None:
    # A person applies a UserAgent with kubectl; the operator, with only the chart's
    # rights, makes it Ready.
    manifest = {
        "apiVersion": "dexorder.ai/v1alpha1",
        "kind": "UserAgent",
        "metadata": {"name": "smoke", "namespace": release.agents},
        "spec": {"userId": "smoke", "tier": "free", "storage": {"reclaimPolicy": "Delete"}},
    }
    kubectl.run("apply", "-f", "-", input=json.dumps(manifest))
    kubectl.run(
        "wait",
        "useragent/smoke",
        f"-n={release.agents}",
        "--for=jsonpath={.status.phase}=Ready",
        "--timeout=60s",
    )
    listed = kubectl.run("get", "ua", f"-n={release.agents}", "-o", "wide").stdout
    assert f"http://smoke-agent.{release.agents}.svc:8000/mcp" in listed, listed

    # The gateway's provisioner, with only the chart's rights: create the user's
    # UserAgent, watch it to Ready, read its token Secret.
    gateway_kubeconfig = _service_account_kubeconfig(
        kubectl, control_plane, release, "gateway", tmp_path / "gateway.kubeconfig"
    )
    catalog = parse_tier_catalog(TIER_CATALOG.read_text())
    license = resolve_license(
        License(user_id="auth0|carol", tier="pro"), catalog, dt.datetime.now(dt.UTC)
    )
    stages: list[Stage] = []

    async def progress(stage: Stage, _: str) -> None:
        stages.append(stage)

    async with KubeClient(load_kubeconfig(gateway_kubeconfig)) as client:
        provisioner = KubernetesProvisioner(client, release.agents, timeout=60)
        endpoint = await provisioner.ensure_agent(license, progress)
        await provisioner.record_activity("auth0|other-user-never-provisioned")
    name = user_agent_name("auth0|carol")
    assert endpoint.url == f"http://{name}-agent.{release.agents}.svc:8000/mcp"
    secret = json.loads(
        kubectl.run("get", "secret", f"{name}-token", f"-n={release.agents}", "-o=json").stdout
    )
    assert endpoint.token == base64.b64decode(secret["data"]["token"]).decode()
    assert stages[0] == Stage.PROVISIONING
    assert stages[-1] == Stage.READY

    # Deleting is the operator's finalizer's work, also within its rights: smoke's volume
    # (reclaimPolicy Delete) is deleted, carol's (Retain, the default) is kept.
    kubectl.run("delete", "useragent", "smoke", name, f"-n={release.agents}", "--timeout=60s")
    kubectl.run("wait", "--for=delete", "pvc/smoke-data", f"-n={release.agents}", "--timeout=60s")
    kept = kubectl.run("get", "pvc", f"{name}-data", f"-n={release.agents}", "-o=json").stdout
    assert not json.loads(kept)["metadata"].get("deletionTimestamp")
    log = operator_as_its_account.log()
    assert f"released {release.agents}/smoke (volume: Delete)" in log
    assert "forbidden" not in log.lower()


def test_the_gateway_account_creates_a_useragent_and_reads_its_token(
    kubectl: Kubectl, release: Release
) -> None:
    gateway = f"--as=system:serviceaccount:{release.namespace}:{release.account('gateway')}"
    manifest = {
        "apiVersion": "dexorder.ai/v1alpha1",
        "kind": "UserAgent",
        "metadata": {"name": "alice", "namespace": release.agents},
        "spec": {"userId": "alice", "tier": "free"},
    }
    created = kubectl.run("create", gateway, "-f", "-", input=json.dumps(manifest), check=False)
    assert created.returncode == 0, created.stderr
    kubectl.run(
        "create",
        "secret",
        "generic",
        "alice-token",
        f"-n={release.agents}",
        "--from-literal=token=not-a-real-token",
    )
    token = kubectl.run(
        "get",
        "secret",
        "alice-token",
        f"-n={release.agents}",
        gateway,
        "-o",
        "jsonpath={.data.token}",
    )
    assert token.stdout
    deleting = kubectl.run(
        "delete", "useragent", "alice", f"-n={release.agents}", gateway, check=False
    )
    assert "forbidden" in deleting.stderr


def test_upgrade_then_uninstall_keeps_the_crd_and_the_agents(
    cluster_helm: Helm, kubectl: Kubectl, release: Release
) -> None:
    def operator_pod() -> str:
        return kubectl.run(
            "get",
            "pods",
            f"-n={release.namespace}",
            "-l",
            "app.kubernetes.io/component=operator",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ).stdout

    before = operator_pod()
    cluster_helm.run(
        "upgrade",
        release.name,
        str(CHART_DIR),
        f"--namespace={release.namespace}",
        "--reuse-values",
        "--set",
        "gateway.replicas=3",
        "--wait",
        "--timeout=150s",
    )
    gateway = _deployments(kubectl, release.namespace)["dx-dexorder-gateway"]
    assert gateway["status"]["availableReplicas"] == 3
    # Nothing the operator reads changed, so it was not restarted.
    assert operator_pod() == before
    history = json.loads(
        cluster_helm.run(
            "history", release.name, f"--namespace={release.namespace}", "-o", "json"
        ).stdout
    )
    assert [entry["status"] for entry in history] == ["superseded", "deployed"]

    cluster_helm.run("uninstall", release.name, f"--namespace={release.namespace}", "--wait")
    assert _deployments(kubectl, release.namespace) == {}
    assert (
        kubectl.run(
            "get", "clusterrole", f"{release.namespace}-dx-dexorder-operator", check=False
        ).returncode
        != 0
    )
    # Kept: the CRD (deleting it would delete every UserAgent) and the users' namespace.
    kubectl.run("get", CRD)
    kubectl.run("get", "namespace", release.agents)
    kubectl.run("get", "useragent", "alice", f"-n={release.agents}")
