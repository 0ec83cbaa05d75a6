"""Getting a user an agent: one interface, a Kubernetes and a local implementation."""

from dexorder.gateway.agents.provisioning.base import (
    AgentEndpoint,
    Progress,
    Provisioner,
    ProvisioningError,
    Stage,
)

__all__ = ["AgentEndpoint", "Progress", "Provisioner", "ProvisioningError", "Stage"]
