"""Getting a user an agent: one interface, a Kubernetes and a local implementation."""

from dexorder.gateway.agents.provisioning.base import (
    AgentEndpoint,
    AgentsAtCapacity,
    Progress,
    Provisioner,
    ProvisioningError,
    Stage,
)

__all__ = [
    "AgentEndpoint",
    "AgentsAtCapacity",
    "Progress",
    "Provisioner",
    "ProvisioningError",
    "Stage",
]
