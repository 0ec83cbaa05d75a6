"""The model list as values, and its resolution into the arguments litellm is called with.

Models are data (``config/models.yaml``): groups such as ``fast``, ``standard`` and ``deep``,
each an ordered list of deployments to try. A deployment names its API key by the environment
variable that holds it; the caller passes the values in, so nothing here reads the environment.
``DEFAULT_MODEL_PROVIDER`` and ``DEFAULT_MODEL`` switch the model in one line: that deployment is
tried first in the default group, and stands in for any group with no usable deployment.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RoutingError(Exception):
    """The model settings cannot produce a usable model; the message names the setting."""


class Provider(StrEnum):
    ANTHROPIC = "anthropic"
    OPENAI = "openai"
    GOOGLE = "google"
    OPENROUTER = "openrouter"
    OLLAMA = "ollama"


@dataclass(frozen=True)
class ProviderSpec:
    """How one provider's models are named for litellm, and which setting holds its key."""

    litellm_prefix: str
    api_key_env: str | None
    api_base_env: str | None = None


PROVIDERS: Final[Mapping[Provider, ProviderSpec]] = {
    Provider.ANTHROPIC: ProviderSpec("anthropic", "ANTHROPIC_API_KEY"),
    Provider.OPENAI: ProviderSpec("openai", "OPENAI_API_KEY"),
    Provider.GOOGLE: ProviderSpec("gemini", "GOOGLE_API_KEY"),
    Provider.OPENROUTER: ProviderSpec("openrouter", "OPENROUTER_API_KEY"),
    # `ollama_chat` speaks Ollama's chat endpoint, which supports tools; `ollama` does not.
    Provider.OLLAMA: ProviderSpec("ollama_chat", None, "OLLAMA_URL"),
}

PROVIDER_ALIASES: Final[Mapping[str, Provider]] = {
    "gemini": Provider.GOOGLE,
    "claude": Provider.ANTHROPIC,
}

PROVIDER_SETTINGS: Final = (
    "ANTHROPIC_API_KEY",
    "OPENAI_API_KEY",
    "GOOGLE_API_KEY",
    "OPENROUTER_API_KEY",
    "OLLAMA_URL",
)


class Deployment(BaseModel):
    """One way to reach a model: a litellm model string and where its key and base URL live."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=3, pattern=r"^[\w.-]+/.+$")
    api_base: str | None = None
    api_base_env: str | None = None
    api_key_env: str | None = None

    @model_validator(mode="after")
    def _one_base(self) -> Deployment:
        if self.api_base is not None and self.api_base_env is not None:
            raise ValueError("set api_base or api_base_env, not both")
        return self


class ModelList(BaseModel):
    """The groups of deployments, in the order they are tried."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default_group: str = "standard"
    groups: dict[str, list[Deployment]]

    @model_validator(mode="after")
    def _default_group_exists(self) -> ModelList:
        if self.default_group not in self.groups:
            known = ", ".join(self.groups) or "none"
            raise ValueError(f"default_group {self.default_group!r} is not a group ({known})")
        return self


@dataclass(frozen=True)
class LLMTarget:
    """A resolved deployment: exactly the keyword arguments of one litellm call."""

    model: str
    api_base: str | None = None
    api_key: str | None = field(default=None, repr=False)

    def litellm_kwargs(self) -> dict[str, str]:
        kwargs = {"model": self.model}
        if self.api_base is not None:
            kwargs["api_base"] = self.api_base
        if self.api_key is not None:
            kwargs["api_key"] = self.api_key
        return kwargs


def parse_provider(name: str) -> Provider:
    cleaned = name.strip().lower()
    if cleaned in PROVIDER_ALIASES:
        return PROVIDER_ALIASES[cleaned]
    try:
        return Provider(cleaned)
    except ValueError as error:
        known = ", ".join(p.value for p in Provider)
        raise RoutingError(
            f"DEFAULT_MODEL_PROVIDER={name!r} is not a provider; use one of {known}"
        ) from error


def default_deployment(provider_name: str, model: str) -> Deployment:
    """The deployment that ``DEFAULT_MODEL_PROVIDER`` and ``DEFAULT_MODEL`` name."""
    provider = parse_provider(provider_name)
    spec = PROVIDERS[provider]
    name = model.strip()
    if not name:
        raise RoutingError("DEFAULT_MODEL is empty; name a model, such as gpt-4o-mini")
    prefix = f"{spec.litellm_prefix}/"
    # Accept the litellm spelling too ("anthropic/claude-..."), without doubling the prefix.
    litellm_model = name if name.startswith(prefix) else prefix + name
    return Deployment(
        model=litellm_model, api_key_env=spec.api_key_env, api_base_env=spec.api_base_env
    )


def _present(settings: Mapping[str, str | None], name: str) -> str | None:
    value = settings.get(name)
    return value if value else None


def missing_settings(deployment: Deployment, settings: Mapping[str, str | None]) -> list[str]:
    """The settings a deployment needs that are not set."""
    needed = [deployment.api_key_env, deployment.api_base_env]
    return [name for name in needed if name is not None and _present(settings, name) is None]


def resolve(deployment: Deployment, settings: Mapping[str, str | None]) -> LLMTarget:
    """The litellm arguments of a deployment; ``settings`` maps setting names to values."""
    missing = missing_settings(deployment, settings)
    if missing:
        raise RoutingError(f"model {deployment.model} needs {' and '.join(missing)} to be set")
    api_base = deployment.api_base
    if deployment.api_base_env is not None:
        api_base = _present(settings, deployment.api_base_env)
    api_key = None if deployment.api_key_env is None else settings[deployment.api_key_env]
    return LLMTarget(model=deployment.model, api_base=api_base, api_key=api_key)


def resolve_groups(
    models: ModelList,
    settings: Mapping[str, str | None],
    default: Deployment | None = None,
) -> dict[str, list[LLMTarget]]:
    """Every group's usable targets, in the order to try them.

    Deployments whose settings are missing are left out, so a key for one provider is enough.
    The default deployment, when given, is tried first in the default group and stands in for
    a group left empty; a group still empty borrows the default group's targets. A
    configuration where no group can reach any model is refused.
    """
    if default is not None:
        missing = missing_settings(default, settings)
        if missing:
            raise RoutingError(
                f"DEFAULT_MODEL {default.model} needs {' and '.join(missing)} to be set"
            )
    resolved: dict[str, list[LLMTarget]] = {}
    for group, deployments in models.groups.items():
        candidates = list(deployments)
        if default is not None and group == models.default_group:
            candidates = [default, *(d for d in candidates if d != default)]
        targets = [resolve(d, settings) for d in candidates if not missing_settings(d, settings)]
        if not targets and default is not None:
            targets = [resolve(default, settings)]
        resolved[group] = targets
    usable = [targets for targets in resolved.values() if targets]
    if not usable:
        raise RoutingError(
            "no model is usable: set DEFAULT_MODEL_PROVIDER and DEFAULT_MODEL, or one of "
            + ", ".join(PROVIDER_SETTINGS)
        )
    # A group with nothing usable borrows the default group's targets (or the first usable
    # group's), so any group the router picks can answer.
    stand_in = resolved[models.default_group] or usable[0]
    return {group: targets or list(stand_in) for group, targets in resolved.items()}
