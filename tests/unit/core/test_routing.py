"""Resolving the model list and the default-model settings into litellm arguments."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dexorder.core.routing import (
    Deployment,
    LLMTarget,
    ModelList,
    Provider,
    RoutingError,
    default_deployment,
    parse_provider,
    resolve,
    resolve_groups,
)

MODELS = ModelList(
    default_group="standard",
    groups={
        "fast": [
            Deployment(model="openai/gpt-4.1-mini", api_key_env="OPENAI_API_KEY"),
            Deployment(model="ollama_chat/llama3.2", api_base_env="OLLAMA_URL"),
        ],
        "standard": [
            Deployment(model="anthropic/claude-sonnet-4-5", api_key_env="ANTHROPIC_API_KEY"),
            Deployment(model="openai/gpt-4.1", api_key_env="OPENAI_API_KEY"),
        ],
        "deep": [Deployment(model="anthropic/claude-opus-4-1", api_key_env="ANTHROPIC_API_KEY")],
    },
)


def models_of(targets: list[LLMTarget]) -> list[str]:
    return [target.model for target in targets]


@pytest.mark.parametrize(
    ("provider", "model", "expected", "key_env", "base_env"),
    [
        (
            "anthropic",
            "claude-sonnet-4-5",
            "anthropic/claude-sonnet-4-5",
            "ANTHROPIC_API_KEY",
            None,
        ),
        ("openai", "gpt-4.1-mini", "openai/gpt-4.1-mini", "OPENAI_API_KEY", None),
        ("google", "gemini-2.5-flash", "gemini/gemini-2.5-flash", "GOOGLE_API_KEY", None),
        ("Gemini", "gemini-2.5-pro", "gemini/gemini-2.5-pro", "GOOGLE_API_KEY", None),
        ("openrouter", "meta-llama/x", "openrouter/meta-llama/x", "OPENROUTER_API_KEY", None),
        ("ollama", "llama3.2", "ollama_chat/llama3.2", None, "OLLAMA_URL"),
        ("anthropic", "anthropic/claude-x", "anthropic/claude-x", "ANTHROPIC_API_KEY", None),
        (" OpenAI ", " gpt-4o ", "openai/gpt-4o", "OPENAI_API_KEY", None),
    ],
)
def test_default_deployment_per_provider(
    provider: str, model: str, expected: str, key_env: str | None, base_env: str | None
) -> None:
    deployment = default_deployment(provider, model)
    assert deployment.model == expected
    assert deployment.api_key_env == key_env
    assert deployment.api_base_env == base_env


def test_unknown_provider_names_the_setting_and_the_choices() -> None:
    with pytest.raises(RoutingError, match=r"DEFAULT_MODEL_PROVIDER='azure'.*anthropic, openai"):
        parse_provider("azure")


def test_provider_alias() -> None:
    assert parse_provider("claude") is Provider.ANTHROPIC


def test_empty_default_model_is_refused() -> None:
    with pytest.raises(RoutingError, match="DEFAULT_MODEL is empty"):
        default_deployment("openai", "  ")


def test_resolve_gives_exact_litellm_kwargs() -> None:
    target = resolve(
        Deployment(model="openai/gpt-4.1", api_key_env="OPENAI_API_KEY"),
        {"OPENAI_API_KEY": "sk-1"},
    )
    assert target.litellm_kwargs() == {"model": "openai/gpt-4.1", "api_key": "sk-1"}
    ollama = resolve(
        Deployment(model="ollama_chat/llama3.2", api_base_env="OLLAMA_URL"),
        {"OLLAMA_URL": "http://127.0.0.1:11434"},
    )
    assert ollama.litellm_kwargs() == {
        "model": "ollama_chat/llama3.2",
        "api_base": "http://127.0.0.1:11434",
    }
    fixed = resolve(Deployment(model="openai/local", api_base="http://h/v1"), {})
    assert fixed.litellm_kwargs() == {"model": "openai/local", "api_base": "http://h/v1"}


def test_api_key_is_not_in_the_repr() -> None:
    target = LLMTarget(model="openai/x", api_key="sk-very-secret")
    assert "sk-very-secret" not in repr(target)


def test_resolve_names_the_missing_setting() -> None:
    with pytest.raises(RoutingError, match="anthropic/claude-x needs ANTHROPIC_API_KEY"):
        resolve(Deployment(model="anthropic/claude-x", api_key_env="ANTHROPIC_API_KEY"), {})


def test_empty_value_counts_as_missing() -> None:
    with pytest.raises(RoutingError, match="OPENAI_API_KEY"):
        resolve(Deployment(model="openai/x", api_key_env="OPENAI_API_KEY"), {"OPENAI_API_KEY": ""})


def test_groups_keep_only_deployments_whose_keys_are_set() -> None:
    groups = resolve_groups(MODELS, {"OPENAI_API_KEY": "sk"})
    assert models_of(groups["fast"]) == ["openai/gpt-4.1-mini"]
    assert models_of(groups["standard"]) == ["openai/gpt-4.1"]
    # deep has no OpenAI deployment, so it borrows the default group's targets.
    assert models_of(groups["deep"]) == ["openai/gpt-4.1"]
    assert groups["fast"][0].api_key == "sk"


def test_all_keys_set_keeps_the_file_order() -> None:
    settings = {"OPENAI_API_KEY": "o", "ANTHROPIC_API_KEY": "a", "OLLAMA_URL": "http://o"}
    groups = resolve_groups(MODELS, settings)
    assert models_of(groups["fast"]) == ["openai/gpt-4.1-mini", "ollama_chat/llama3.2"]
    assert models_of(groups["standard"]) == ["anthropic/claude-sonnet-4-5", "openai/gpt-4.1"]
    assert models_of(groups["deep"]) == ["anthropic/claude-opus-4-1"]


def test_default_model_goes_first_in_the_default_group_and_fills_empty_groups() -> None:
    default = default_deployment("ollama", "qwen2.5:7b")
    groups = resolve_groups(MODELS, {"OLLAMA_URL": "http://127.0.0.1:11434"}, default)
    assert models_of(groups["standard"]) == ["ollama_chat/qwen2.5:7b"]
    assert models_of(groups["fast"]) == ["ollama_chat/llama3.2"]
    assert models_of(groups["deep"]) == ["ollama_chat/qwen2.5:7b"]
    assert groups["deep"][0].api_base == "http://127.0.0.1:11434"


def test_default_model_already_listed_is_not_tried_twice() -> None:
    default = default_deployment("openai", "gpt-4.1")
    groups = resolve_groups(MODELS, {"OPENAI_API_KEY": "o", "ANTHROPIC_API_KEY": "a"}, default)
    assert models_of(groups["standard"]) == ["openai/gpt-4.1", "anthropic/claude-sonnet-4-5"]


def test_default_model_without_its_key_names_the_key() -> None:
    default = default_deployment("anthropic", "claude-sonnet-4-5")
    with pytest.raises(RoutingError, match="DEFAULT_MODEL anthropic/claude-sonnet-4-5 needs"):
        resolve_groups(MODELS, {"OPENAI_API_KEY": "o"}, default)


def test_nothing_configured_says_what_to_set() -> None:
    with pytest.raises(RoutingError, match="set DEFAULT_MODEL_PROVIDER and DEFAULT_MODEL"):
        resolve_groups(MODELS, {})


def test_model_list_refuses_an_unknown_default_group() -> None:
    with pytest.raises(ValidationError, match="default_group 'huge' is not a group"):
        ModelList(default_group="huge", groups={"fast": []})


@pytest.mark.parametrize(
    "fields",
    [
        {"model": "no-provider-prefix"},
        {"model": "openai/x", "api_base": "http://a", "api_base_env": "OLLAMA_URL"},
        {"model": "openai/x", "api_key": "sk-inline-keys-are-not-allowed"},
    ],
)
def test_deployment_refuses_bad_fields(fields: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        Deployment.model_validate(fields)
