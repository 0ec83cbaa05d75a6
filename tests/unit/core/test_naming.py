import re

import pytest
import yaml

from dexorder.core import naming
from dexorder.devenv.paths import REPO_ROOT

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@pytest.mark.parametrize(
    "user_id", ["alice", "auth0|5f3c9a", "Alice@Example.com", "x" * 300, "日本語", "--"]
)
def test_agent_names_are_dns_labels_with_room_for_child_suffixes(user_id: str) -> None:
    name = naming.user_agent_name(user_id)
    for child in (
        naming.deployment_name(name),
        naming.pvc_name(name),
        naming.token_secret_name(name),
    ):
        assert DNS_LABEL.match(child), child
        assert len(child) <= 63


def test_ids_that_sanitise_alike_get_different_names() -> None:
    assert naming.user_agent_name("a.b") != naming.user_agent_name("a_b")
    assert naming.user_agent_name("alice") == naming.user_agent_name("alice")


def test_empty_user_id_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        naming.user_agent_name("")


def test_label_value_keeps_valid_values_and_shortens_others() -> None:
    assert naming.label_value("alice") == "alice"
    long = naming.label_value("auth0|" + "z" * 100)
    assert len(long) <= 63
    assert re.match(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$", long)


@pytest.mark.parametrize(
    "user_id",
    ["auth0|alice", "google-oauth2|109876543210", "Alice@Example.com", "日本語", "x" * 253],
)
def test_identity_providers_ids_are_user_ids(user_id: str) -> None:
    assert naming.user_id_problem(user_id) is None


@pytest.mark.parametrize(
    ("user_id", "problem"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("x" * 254, "at most 253"),
        ("alice\nadmin", "control characters"),
        ("alice\x00", "control characters"),
    ],
)
def test_what_cannot_name_a_user_is_said(user_id: str, problem: str) -> None:
    found = naming.user_id_problem(user_id)
    assert found is not None
    assert problem in found


def test_the_crd_bounds_user_ids_as_core_does() -> None:
    crd = yaml.safe_load((REPO_ROOT / "crds" / "useragents.dexorder.ai.yaml").read_text())
    [version] = crd["spec"]["versions"]
    user_id = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["userId"]
    assert user_id["minLength"] == 1
    assert user_id["maxLength"] == naming.MAX_USER_ID_LENGTH
