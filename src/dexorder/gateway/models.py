"""Loading the model list (``config/models.yaml``) and applying the model settings to it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import yaml
from pydantic import ValidationError

from dexorder.gateway.pure.routing import (
    Deployment,
    LLMTarget,
    ModelList,
    RoutingError,
    default_deployment,
    resolve_groups,
)


class ModelListError(Exception):
    """The model list file or the model settings are unusable; the message says which."""


def load_model_list(path: Path) -> ModelList:
    """Read and validate a model list file."""
    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ModelListError(f"cannot read the model list {path}: {error}") from error
    except yaml.YAMLError as error:
        raise ModelListError(f"the model list {path} is not valid YAML: {error}") from error
    try:
        return ModelList.model_validate(loaded)
    except ValidationError as error:
        raise ModelListError(f"the model list {path} is invalid: {error}") from error


def chosen_default(provider: str | None, model: str | None) -> Deployment | None:
    """The deployment ``DEFAULT_MODEL_PROVIDER`` and ``DEFAULT_MODEL`` name, if they are set."""
    if not provider and not model:
        return None
    if not provider:
        raise ModelListError("DEFAULT_MODEL is set but DEFAULT_MODEL_PROVIDER is not")
    if not model:
        raise ModelListError("DEFAULT_MODEL_PROVIDER is set but DEFAULT_MODEL is not")
    try:
        return default_deployment(provider, model)
    except RoutingError as error:
        raise ModelListError(str(error)) from error


def model_targets(
    models: ModelList,
    *,
    default_provider: str | None,
    default_model: str | None,
    provider_settings: Mapping[str, str | None],
) -> dict[str, list[LLMTarget]]:
    """Each group's litellm targets, in fallback order, for the settings of this process.

    ``provider_settings`` maps the setting names a deployment refers to (``ANTHROPIC_API_KEY``,
    ``OLLAMA_URL``, ...) to their values, as the settings object read them.
    """
    default = chosen_default(default_provider, default_model)
    try:
        return resolve_groups(models, provider_settings, default)
    except RoutingError as error:
        raise ModelListError(str(error)) from error
