"""The model list as values, and its resolution into the arguments litellm is called with.

Models are data (``config/models.yaml``): groups such as ``fast``, ``standard`` and ``deep``,
each an ordered list of deployments to try. A deployment names its API key by the environment
variable that holds it; the caller passes the values in, so nothing here reads the environment.
``DEFAULT_MODEL_PROVIDER`` and ``DEFAULT_MODEL`` switch the model in one line: that deployment is
tried first in the default group, and stands in for any group with no usable deployment.

``choose_route`` then picks, per message, the group and the deployment that answer it: the
groups the tier allows, the user's preferred model where allowed, else the message's
complexity (``dexorder.gateway.pure.complexity``), with the reason in words.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dexorder.gateway.pure.complexity import Complexity, Level, classify


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


def provider_spec_for(model: str) -> ProviderSpec | None:
    """The provider a litellm model string names by its prefix (``anthropic/...``), if known."""
    prefix = model.split("/", 1)[0].lower()
    if prefix == "ollama":
        prefix = "ollama_chat"
    return next((spec for spec in PROVIDERS.values() if spec.litellm_prefix == prefix), None)


class Deployment(BaseModel):
    """One way to reach a model: a litellm model string and where its key and base URL live.

    In the model list a deployment may be just its model string (``- openai/gpt-4.1``): the
    provider prefix then names the setting that holds its key (or Ollama's URL), so switching
    a deployment to another provider is a one-line edit.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=3, pattern=r"^[\w.-]+/.+$")
    api_base: str | None = None
    api_base_env: str | None = None
    api_key_env: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _settings_from_the_provider(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = {"model": data}
        where = {"api_base", "api_base_env", "api_key_env"}
        if isinstance(data, dict) and not where & data.keys():
            spec = provider_spec_for(str(data.get("model", "")))
            if spec is not None:
                data = {**data, "api_key_env": spec.api_key_env, "api_base_env": spec.api_base_env}
        return data

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


# --- choosing a group and a deployment for one message -----------------------------------


class RouteSource(StrEnum):
    """What decided a route: the user's preferred model, the message's complexity, or the
    caller, for work of its own (a workflow's summary) rather than a user's message."""

    PREFERENCE = "preference"
    COMPLEXITY = "complexity"
    FIXED = "fixed"


@dataclass(frozen=True)
class RouteChoice:
    """The model group and deployment for one message, and why, in words for the user.

    ``order`` indexes the group's targets (as ``resolve_groups`` returned them) in the order to
    try them: the first answers, the rest are the fallbacks.
    """

    group: str
    deployment: str
    order: tuple[int, ...]
    reason: str
    source: RouteSource
    complexity: Complexity | None = None

    def summary(self) -> dict[str, str]:
        """The ``route`` of the ``done`` frame: group, model and reason."""
        return {"group": self.group, "model": self.deployment, "reason": self.reason}


def allowed_groups(licensed: Sequence[str], configured: Iterable[str]) -> tuple[str, ...]:
    """The groups a user may get: the license's (the tier's, or its features' override) that
    the model list defines, in the license's order."""
    known = set(configured)
    return tuple(group for group in licensed if group in known)


def _ladder_rank(group: str) -> int | None:
    try:
        return Level(group).rank
    except ValueError:
        return None


def group_for_level(level: Level, allowed: Sequence[str]) -> tuple[str, str]:
    """The allowed group nearest a complexity level, and a note when it is not the level's own.

    A harder message than the tier allows gets the strongest group allowed below it; an easier
    one than the tier's weakest group gets that weakest group.
    """
    if level.value in allowed:
        return level.value, ""
    ranked = sorted((rank, group) for group in allowed if (rank := _ladder_rank(group)) is not None)
    below = [group for rank, group in ranked if rank < level.rank]
    if below:
        return below[-1], f"capped at {below[-1]}, the strongest group allowed"
    if ranked:
        return ranked[0][1], f"raised to {ranked[0][1]}, the lightest group allowed"
    return allowed[0], f"{allowed[0]} is the only kind of group allowed"


def _model_matches(model: str, wanted: str) -> bool:
    model, wanted = model.lower(), wanted.lower()
    return model == wanted or model.split("/", 1)[-1] == wanted or model.endswith("/" + wanted)


def _find_preferred(
    wanted: str, groups: Mapping[str, Sequence[LLMTarget]], search: Sequence[str]
) -> tuple[str, int] | None:
    for group in search:
        for index, target in enumerate(groups.get(group, ())):
            if _model_matches(target.model, wanted):
                return group, index
    return None


def _order_from(first: int, size: int) -> tuple[int, ...]:
    return (first, *(index for index in range(size) if index != first))


def choose_route(
    text: str,
    *,
    groups: Mapping[str, Sequence[LLMTarget]],
    allowed: Sequence[str],
    tier: str,
    preferred_model: str | None = None,
) -> RouteChoice:
    """The route for one user message.

    In order: the tier (``allowed``, already narrowed by the license's features) decides which
    groups may answer; the user's preferred model (a group name, or a deployment's model with or
    without its provider prefix) is used when one of those groups holds it; otherwise the
    message's complexity picks the group. Raises ``RoutingError`` when no group is allowed.
    """
    usable = [group for group in allowed if groups.get(group)]
    if not usable:
        raise RoutingError(
            f"no model group is allowed for the {tier} tier: it allows "
            f"{', '.join(allowed) or 'none'}, the model list has {', '.join(groups) or 'none'}"
        )
    note = ""
    wanted = (preferred_model or "").strip()
    if wanted:
        if wanted.lower() in usable:
            group = wanted.lower()
            return RouteChoice(
                group=group,
                deployment=groups[group][0].model,
                order=_order_from(0, len(groups[group])),
                reason=f"your preferred model group {group}, allowed for the {tier} tier",
                source=RouteSource.PREFERENCE,
            )
        found = _find_preferred(wanted, groups, usable)
        if found is not None:
            group, index = found
            targets = groups[group]
            return RouteChoice(
                group=group,
                deployment=targets[index].model,
                order=_order_from(index, len(targets)),
                reason=f"your preferred model {wanted}, in the {group} group allowed for the "
                f"{tier} tier",
                source=RouteSource.PREFERENCE,
            )
        elsewhere = _find_preferred(wanted, groups, [g for g in groups if g not in usable])
        if elsewhere is not None or wanted.lower() in groups:
            home = elsewhere[0] if elsewhere is not None else wanted.lower()
            note = f"your preferred model {wanted} is in the {home} group, not allowed for the "
            note += f"{tier} tier; "
        else:
            note = f"your preferred model {wanted} is not configured; "
    complexity = classify(text)
    group, adjusted = group_for_level(complexity.level, usable)
    reason = f"{note}complexity {complexity.explain()}"
    if adjusted:
        reason += f"; {adjusted} for the {tier} tier"
    return RouteChoice(
        group=group,
        deployment=groups[group][0].model,
        order=_order_from(0, len(groups[group])),
        reason=reason,
        source=RouteSource.COMPLEXITY,
        complexity=complexity,
    )
