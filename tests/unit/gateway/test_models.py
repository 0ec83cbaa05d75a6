"""Loading the model list file and applying DEFAULT_MODEL_PROVIDER / DEFAULT_MODEL to it."""

from __future__ import annotations

from pathlib import Path

import pytest

from dexorder.gateway.models import ModelListError, chosen_default, load_model_list, model_targets

SHIPPED = Path(__file__).resolve().parents[3] / "config" / "models.yaml"
PROVIDER_KEYS = (
    "ANTHROPIC_API_KEY",
    "OPENAI_API_KEY",
    "GOOGLE_API_KEY",
    "OPENROUTER_API_KEY",
    "OLLAMA_URL",
)


def test_shipped_model_list_loads_with_three_groups() -> None:
    models = load_model_list(SHIPPED)
    assert set(models.groups) == {"fast", "standard", "deep"}
    assert models.default_group == "standard"
    assert all(models.groups.values())


@pytest.mark.parametrize("key", PROVIDER_KEYS)
def test_any_single_provider_setting_serves_every_group(key: str) -> None:
    value = "http://127.0.0.1:11434" if key == "OLLAMA_URL" else "secret"
    targets = model_targets(
        load_model_list(SHIPPED),
        default_provider=None,
        default_model=None,
        provider_settings={key: value},
    )
    assert set(targets) == {"fast", "standard", "deep"}
    for group_targets in targets.values():
        assert group_targets
        for target in group_targets:
            assert value in (target.api_key, target.api_base)


def test_default_model_switches_the_model_in_one_line() -> None:
    targets = model_targets(
        load_model_list(SHIPPED),
        default_provider="openrouter",
        default_model="mistralai/mistral-large",
        provider_settings={"OPENROUTER_API_KEY": "or-key"},
    )
    first = targets["standard"][0]
    assert first.litellm_kwargs() == {
        "model": "openrouter/mistralai/mistral-large",
        "api_key": "or-key",
    }


@pytest.mark.parametrize(
    ("provider", "model", "message"),
    [
        (None, "gpt-4o", "DEFAULT_MODEL is set but DEFAULT_MODEL_PROVIDER is not"),
        ("openai", None, "DEFAULT_MODEL_PROVIDER is set but DEFAULT_MODEL is not"),
        ("skynet", "t-800", "DEFAULT_MODEL_PROVIDER='skynet' is not a provider"),
    ],
)
def test_contradictory_default_settings_are_named(
    provider: str | None, model: str | None, message: str
) -> None:
    with pytest.raises(ModelListError, match=message):
        chosen_default(provider, model)


def test_no_usable_model_is_an_error_naming_the_settings() -> None:
    with pytest.raises(ModelListError, match="ANTHROPIC_API_KEY, OPENAI_API_KEY"):
        model_targets(
            load_model_list(SHIPPED),
            default_provider=None,
            default_model=None,
            provider_settings={},
        )


def test_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ModelListError, match=f"cannot read the model list {missing}"):
        load_model_list(missing)


def test_bad_yaml_is_named(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("groups: [unclosed")
    with pytest.raises(ModelListError, match="is not valid YAML"):
        load_model_list(path)


def test_invalid_content_is_named(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("groups:\n  fast:\n    - model: gpt-4o\n      api_key: sk-inline\n")
    with pytest.raises(ModelListError, match="is invalid") as caught:
        load_model_list(path)
    assert "groups.fast.0" in str(caught.value)
