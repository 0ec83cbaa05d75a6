import re

import pytest

from dexorder.core import naming

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
