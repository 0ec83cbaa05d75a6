"""The operator's one settings object, read from the environment once at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from dexorder.core.manifests import DEFAULT_ENDPOINT_TEMPLATE


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DEXORDER_OPERATOR_", extra="ignore")

    namespaces: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Namespaces to watch (comma-separated); empty watches the whole cluster.",
    )
    default_image: str = "ghcr.io/dexorder/agent:0.1.0"
    agent_port: int = Field(default=8000, ge=1, le=65535)
    tier_catalog_path: Path = Path("config/tiers.yaml")
    endpoint_template: str = DEFAULT_ENDPOINT_TEMPLATE
    storage_class: str | None = None
    progress_deadline_seconds: int = Field(default=300, ge=10)
    idle_check_interval_seconds: float = Field(default=30.0, gt=0)
    headless_services: bool = Field(
        default=True,
        description="Agent Services without a cluster IP (DNS resolves to the pod): no IP "
        "allocation, the slowest step of a burst of creates.",
    )
    reconcile_workers: int = Field(
        default=100, ge=1, description="Agents reconciled at once; their API calls share one pool."
    )
    kubeconfig: Path | None = Field(
        default=None, description="Unset: the in-cluster service account."
    )
    metrics_host: str = "0.0.0.0"
    metrics_port: int = Field(default=8080, ge=0, le=65535)
    health_port: int = Field(default=8081, ge=0, le=65535)
    watch_server_timeout_seconds: int = Field(
        default=300,
        ge=10,
        description="Each watch is ended by the server after this long and opened again; "
        "the client gives up 15 s later, so a watch that went silent is noticed.",
    )

    relist_seconds: float = Field(
        default=300.0,
        gt=0,
        description="The UserAgents are listed again this often, and any agent the list no "
        "longer has is forgotten (however its deletion was missed).",
    )

    resync_seconds: float = Field(
        default=3600.0,
        gt=0,
        description="Every agent's Deployment and Service are read this often (each round "
        "a quarter shorter or longer, in a random order, spread over the round; in the "
        "lowest lane of the work queue) and applied again if they drifted: edits no watch "
        "event showed. Two reads per agent and round.",
    )

    max_rollouts: int = Field(
        default=10,
        ge=1,
        description="Running agents restarted at once for an upgrade (a new default image "
        "or tier size renders the same spec differently); the rest wait their turn, and "
        "suspended agents take it at once, to run it at their next wake.",
    )
    rollout_retry_seconds: float = Field(default=2.0, gt=0)
    leader_election: bool = Field(
        default=True,
        description="Work only while holding the Lease (replicas beyond one stand by, "
        "watching); off: work at once, and never run two.",
    )
    leader_election_namespace: str = Field(
        default="default", description="Where the Lease (dexorder-operator) lives."
    )
    lease_seconds: float = Field(default=10.0, gt=0)
    lease_renew_deadline_seconds: float = Field(default=7.0, gt=0)
    lease_retry_seconds: float = Field(default=2.0, gt=0)

    @field_validator("namespaces", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("endpoint_template")
    @classmethod
    def _endpoint_fields(cls, value: str) -> str:
        try:
            value.format(service="s", namespace="n", port=1)
        except (KeyError, IndexError) as error:
            raise ValueError(
                f"endpoint_template may use only {{service}}, {{namespace}} and {{port}}: {error}"
            ) from error
        return value
