"""Resolving the model list and the default-model settings into litellm arguments, and
choosing a route (group, deployment, reason) for each message."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from dexorder.core.tiers import parse_tier_catalog
from dexorder.gateway.pure.complexity import Level
from dexorder.gateway.pure.licenses import FeatureFlags, License, resolve_license
from dexorder.gateway.pure.routing import (
    Deployment,
    LLMTarget,
    ModelList,
    Provider,
    RouteSource,
    RoutingError,
    allowed_groups,
    choose_route,
    default_deployment,
    group_for_level,
    parse_provider,
    resolve,
    resolve_groups,
)

CONFIG = Path(__file__).resolve().parents[4] / "config"

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


# --- one-line deployments ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "key_env", "base_env"),
    [
        ("anthropic/claude-haiku-4-5", "ANTHROPIC_API_KEY", None),
        ("openai/gpt-4.1", "OPENAI_API_KEY", None),
        ("gemini/gemini-2.5-pro", "GOOGLE_API_KEY", None),
        ("openrouter/deepseek/deepseek-r1", "OPENROUTER_API_KEY", None),
        ("ollama_chat/llama3.2", None, "OLLAMA_URL"),
        ("ollama/llama3.2", None, "OLLAMA_URL"),
    ],
)
def test_a_one_line_deployment_takes_its_settings_from_the_provider(
    line: str, key_env: str | None, base_env: str | None
) -> None:
    deployment = Deployment.model_validate(line)
    assert deployment.model == line
    assert (deployment.api_key_env, deployment.api_base_env) == (key_env, base_env)


def test_explicit_settings_are_never_overridden_by_the_prefix() -> None:
    own = Deployment.model_validate({"model": "openai/local", "api_base": "http://h/v1"})
    assert own.api_key_env is None
    assert resolve(own, {}).litellm_kwargs() == {"model": "openai/local", "api_base": "http://h/v1"}


def test_an_unknown_prefix_needs_no_setting() -> None:
    assert missing_settings_of("vllm/some-model") == []


def missing_settings_of(line: str) -> list[str]:
    deployment = Deployment.model_validate(line)
    return [n for n in (deployment.api_key_env, deployment.api_base_env) if n is not None]


def test_switching_a_provider_is_one_line_of_the_model_list() -> None:
    text = (CONFIG / "models.yaml").read_text()
    switched = text.replace("- anthropic/claude-haiku-4-5", "- gemini/gemini-2.5-flash-lite", 1)
    assert sum(a != b for a, b in zip(text.splitlines(), switched.splitlines(), strict=True)) == 1
    models = ModelList.model_validate(yaml.safe_load(switched))
    groups = resolve_groups(models, {"GOOGLE_API_KEY": "g"})
    assert models_of(groups["fast"])[0] == "gemini/gemini-2.5-flash-lite"


# --- allowed groups: the tier, changed by the license's features ---------------------------

NOW = dt.datetime(2026, 11, 24, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("tier", "features", "expected"),
    [
        ("free", None, ("fast",)),
        ("pro", None, ("fast", "standard")),
        ("enterprise", None, ("fast", "standard", "deep")),
        ("free", ("fast", "deep"), ("fast", "deep")),
        ("enterprise", ("fast",), ("fast",)),
    ],
)
def test_tier_allows_groups_and_features_change_them(
    tier: str, features: tuple[str, ...] | None, expected: tuple[str, ...]
) -> None:
    catalog = parse_tier_catalog((CONFIG / "tiers.yaml").read_text())
    license = License(user_id="u1", tier=tier, features=FeatureFlags(model_groups=features))
    effective = resolve_license(license, catalog, NOW)
    assert allowed_groups(effective.model_groups, ("fast", "standard", "deep")) == expected


def test_allowed_groups_leave_out_groups_the_model_list_lacks() -> None:
    assert allowed_groups(("fast", "turbo", "deep"), ("deep", "fast")) == ("fast", "deep")


# --- choosing the route ---------------------------------------------------------------------

GROUPS: dict[str, list[LLMTarget]] = {
    "fast": [LLMTarget("openai/gpt-4.1-mini"), LLMTarget("ollama_chat/llama3.2")],
    "standard": [LLMTarget("anthropic/claude-sonnet-4-5"), LLMTarget("openai/gpt-4.1")],
    "deep": [LLMTarget("anthropic/claude-opus-4-1"), LLMTarget("openai/o3")],
}
ALL = ("fast", "standard", "deep")
BACKTEST = "Backtest a 20/50 SMA crossover on BTC since 2020 and report the drawdown."
COMPARE = "Compare ETH and SOL for me."


def route(
    text: str, allowed: Sequence[str] = ALL, preferred: str | None = None, tier: str = "pro"
) -> tuple[str, str, tuple[int, ...], str, RouteSource]:
    choice = choose_route(
        text, groups=GROUPS, allowed=allowed, tier=tier, preferred_model=preferred
    )
    return choice.group, choice.deployment, choice.order, choice.reason, choice.source


def test_complexity_picks_the_group_when_there_is_no_preference() -> None:
    assert route("hi")[:3] == ("fast", "openai/gpt-4.1-mini", (0, 1))
    assert route(COMPARE)[0] == "standard"
    group, deployment, _, reason, source = route(BACKTEST)
    assert (group, deployment, source) == (
        "deep",
        "anthropic/claude-opus-4-1",
        RouteSource.COMPLEXITY,
    )
    assert reason.startswith("complexity deep (score ")
    assert "asks for a backtest" in reason


def test_a_hard_message_is_capped_at_the_strongest_allowed_group() -> None:
    group, _, _, reason, _ = route(BACKTEST, allowed=("fast", "standard"))
    assert group == "standard"
    assert reason.endswith("; capped at standard, the strongest group allowed for the pro tier")
    assert route(BACKTEST, allowed=("fast",), tier="free")[0] == "fast"


def test_an_easy_message_is_raised_to_the_lightest_allowed_group() -> None:
    group, _, _, reason, _ = route("hi", allowed=("deep", "standard"), tier="custom")
    assert group == "standard"
    assert "raised to standard, the lightest group allowed for the custom tier" in reason


def test_preferred_model_wins_where_the_tier_allows_it() -> None:
    group, deployment, order, reason, source = route("hi", preferred="gpt-4.1")
    assert (group, deployment, order) == ("standard", "openai/gpt-4.1", (1, 0))
    assert source is RouteSource.PREFERENCE
    assert reason == "your preferred model gpt-4.1, in the standard group allowed for the pro tier"


def test_preferred_model_matches_with_or_without_the_prefix_in_any_case() -> None:
    assert route("hi", preferred="OpenAI/GPT-4.1")[1] == "openai/gpt-4.1"
    assert route("hi", preferred="claude-sonnet-4-5")[1] == "anthropic/claude-sonnet-4-5"


def test_preferred_group_name_is_honoured() -> None:
    group, deployment, _, reason, source = route(BACKTEST, preferred="fast")
    assert (group, deployment, source) == ("fast", "openai/gpt-4.1-mini", RouteSource.PREFERENCE)
    assert reason == "your preferred model group fast, allowed for the pro tier"


def test_preferred_model_outside_the_tier_falls_back_to_complexity_and_says_why() -> None:
    group, _, _, reason, source = route(COMPARE, allowed=("fast", "standard"), preferred="o3")
    assert (group, source) == ("standard", RouteSource.COMPLEXITY)
    assert reason.startswith(
        "your preferred model o3 is in the deep group, not allowed for the pro tier; complexity "
    )


def test_unknown_preferred_model_is_named() -> None:
    _, _, _, reason, source = route("hi", preferred="skynet-9000")
    assert source is RouteSource.COMPLEXITY
    assert reason.startswith("your preferred model skynet-9000 is not configured; complexity fast")


def test_blank_preference_is_no_preference() -> None:
    assert route("hi", preferred="  ")[4] is RouteSource.COMPLEXITY


def test_no_allowed_group_is_an_error_naming_both_sides() -> None:
    with pytest.raises(RoutingError, match="free tier: it allows turbo, the model list has fast"):
        choose_route("hi", groups=GROUPS, allowed=("turbo",), tier="free")


def test_the_done_frame_summary_has_group_model_and_reason() -> None:
    choice = choose_route(BACKTEST, groups=GROUPS, allowed=ALL, tier="enterprise")
    assert choice.summary() == {
        "group": "deep",
        "model": "anthropic/claude-opus-4-1",
        "reason": choice.reason,
    }
    assert choice.complexity is not None
    assert choice.complexity.level is Level.DEEP


def test_non_ladder_groups_are_used_only_when_nothing_else_is_allowed() -> None:
    assert group_for_level(Level.DEEP, ("special",)) == (
        "special",
        "special is the only kind of group allowed",
    )
    assert group_for_level(Level.FAST, ("special", "standard"))[0] == "standard"
