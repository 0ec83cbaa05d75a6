"""The gateway's settings: the seed's variable names, .env files, and refused combinations."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from dexorder.gateway.settings import (
    GatewaySettings,
    ModelProvider,
    ProvisionerKind,
    SettingsError,
    env_name,
    load_settings,
    load_tier_catalog,
)

SEED_NAMES = (
    "DATABASE_URL",
    "ANTHROPIC_API_KEY",
    "OPENAI_API_KEY",
    "GOOGLE_API_KEY",
    "OPENROUTER_API_KEY",
    "DEFAULT_MODEL_PROVIDER",
    "DEFAULT_MODEL",
    "OLLAMA_URL",
    "REDIS_URL",
    "KAFKA_BOOTSTRAP",
    "KUBECONFIG",
)
REPO = Path(__file__).parents[3]


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """An environment holding only what each test sets, plus the minimal valid set."""
    for name in list(os.environ):
        if name.startswith("DEXORDER_") or name in SEED_NAMES:
            monkeypatch.delenv(name)
    monkeypatch.setenv("DATABASE_URL", "postgresql://dexorder:secret@127.0.0.1:5432/dexorder")
    monkeypatch.setenv("DEXORDER_JWKS_URL", "https://id.example.com/.well-known/jwks.json")
    monkeypatch.setenv("DEXORDER_JWT_ISSUER", "https://id.example.com/")
    monkeypatch.setenv("DEXORDER_JWT_AUDIENCE", "dexorder")
    return monkeypatch


def problems_of(error: pytest.ExceptionInfo[SettingsError]) -> str:
    return "\n".join(error.value.problems)


def test_minimal_environment_gives_the_documented_defaults(env: pytest.MonkeyPatch) -> None:
    settings = load_settings(env_file=None)

    assert settings.jwks_url == "https://id.example.com/.well-known/jwks.json"
    assert settings.jwt_leeway_seconds == 30
    assert settings.auto_enroll is True
    assert settings.provisioner is ProvisionerKind.LOCAL
    assert settings.agents_namespace == "dexorder-agents"
    assert settings.provision_timeout_seconds == 120
    assert settings.redis_url is None
    assert settings.kafka_bootstrap is None
    assert settings.demo_mode is False
    assert settings.tiers_path == Path("config/tiers.yaml")


def test_seed_names_are_read_without_a_prefix(env: pytest.MonkeyPatch) -> None:
    env.setenv("ANTHROPIC_API_KEY", "sk-ant-1")
    env.setenv("DEFAULT_MODEL_PROVIDER", "anthropic")
    env.setenv("DEFAULT_MODEL", "claude-sonnet-4")
    env.setenv("REDIS_URL", "redis://127.0.0.1:6379/0")
    env.setenv("KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    env.setenv("OLLAMA_URL", "http://127.0.0.1:11434")

    settings = load_settings(env_file=None)

    assert settings.default_model_provider is ModelProvider.ANTHROPIC
    assert settings.default_model == "claude-sonnet-4"
    assert settings.provider_api_key(ModelProvider.ANTHROPIC) == "sk-ant-1"
    assert settings.provider_api_key(ModelProvider.OPENAI) is None
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.kafka_bootstrap == "127.0.0.1:9092"
    assert settings.ollama_url == "http://127.0.0.1:11434"


def test_prefixed_names_configure_the_rest(env: pytest.MonkeyPatch) -> None:
    env.setenv("DEXORDER_PROVISIONER", "kubernetes")
    env.setenv("DEXORDER_KUBECONFIG", "/tmp/admin.kubeconfig")
    env.setenv("DEXORDER_AUTO_ENROLL", "false")
    env.setenv("DEXORDER_PORT", "9000")
    env.setenv("DEXORDER_MAX_TOOL_ROUNDS", "3")
    env.setenv("DEXORDER_PROVISION_TIMEOUT_SECONDS", "30")

    settings = load_settings(env_file=None)

    assert settings.provisioner is ProvisionerKind.KUBERNETES
    assert settings.kubeconfig == Path("/tmp/admin.kubeconfig")
    assert settings.auto_enroll is False
    assert settings.port == 9000
    assert settings.max_tool_rounds == 3
    assert settings.provision_timeout_seconds == 30


def test_the_standard_kubeconfig_variable_is_honoured(env: pytest.MonkeyPatch) -> None:
    env.setenv("KUBECONFIG", "/home/me/.kube/config")

    assert load_settings(env_file=None).kubeconfig == Path("/home/me/.kube/config")


def test_google_is_gemini(env: pytest.MonkeyPatch) -> None:
    env.setenv("DEFAULT_MODEL_PROVIDER", "Google")
    env.setenv("GOOGLE_API_KEY", "g-key")

    settings = load_settings(env_file=None)

    assert settings.default_model_provider is ModelProvider.GEMINI
    assert settings.provider_api_key(ModelProvider.GEMINI) == "g-key"


def test_a_dotenv_file_is_read_and_the_environment_wins(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("DEXORDER_PORT=7000\nREDIS_URL=redis://from-file:6379\nDEFAULT_MODEL=\n")
    env.setenv("DEXORDER_PORT", "7100")

    settings = load_settings(env_file=dotenv)

    assert settings.port == 7100
    assert settings.redis_url == "redis://from-file:6379"
    assert settings.default_model is None


def test_a_missing_dotenv_file_is_fine(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert load_settings(env_file=tmp_path / "absent.env").port == 8080


def test_missing_settings_are_named(env: pytest.MonkeyPatch) -> None:
    env.delenv("DATABASE_URL")
    env.delenv("DEXORDER_JWT_AUDIENCE")

    with pytest.raises(SettingsError) as refused:
        load_settings(env_file=None)

    assert "DATABASE_URL: Field required" in problems_of(refused)
    assert "DEXORDER_JWT_AUDIENCE: Field required" in problems_of(refused)


def test_neither_jwks_nor_dev_secret_is_refused(env: pytest.MonkeyPatch) -> None:
    env.delenv("DEXORDER_JWKS_URL")

    with pytest.raises(SettingsError) as refused:
        load_settings(env_file=None)

    assert problems_of(refused) == (
        "DEXORDER_JWKS_URL is required (or, for development only, DEXORDER_DEV_HS256_SECRET)"
    )


def test_both_jwks_and_dev_secret_is_refused(env: pytest.MonkeyPatch) -> None:
    env.setenv("DEXORDER_DEV_HS256_SECRET", "x" * 32)

    with pytest.raises(SettingsError) as refused:
        load_settings(env_file=None)

    assert "DEXORDER_JWKS_URL and DEXORDER_DEV_HS256_SECRET are both set" in problems_of(refused)


def test_a_dev_secret_alone_is_accepted_if_long_enough(env: pytest.MonkeyPatch) -> None:
    env.delenv("DEXORDER_JWKS_URL")
    env.setenv("DEXORDER_DEV_HS256_SECRET", "short")
    with pytest.raises(SettingsError, match="DEXORDER_DEV_HS256_SECRET must be at least 32"):
        load_settings(env_file=None)

    env.setenv("DEXORDER_DEV_HS256_SECRET", "d" * 32)
    settings = load_settings(env_file=None)

    assert settings.dev_hs256_secret is not None
    assert settings.dev_hs256_secret.get_secret_value() == "d" * 32


@pytest.mark.parametrize(
    ("provider", "needed"),
    [
        ("anthropic", "ANTHROPIC_API_KEY"),
        ("openai", "OPENAI_API_KEY"),
        ("gemini", "GOOGLE_API_KEY"),
        ("openrouter", "OPENROUTER_API_KEY"),
        ("ollama", "OLLAMA_URL"),
    ],
)
def test_a_provider_without_its_key_is_refused(
    env: pytest.MonkeyPatch, provider: str, needed: str
) -> None:
    env.setenv("DEFAULT_MODEL_PROVIDER", provider)

    with pytest.raises(SettingsError) as refused:
        load_settings(env_file=None)

    assert problems_of(refused) == f"DEFAULT_MODEL_PROVIDER={provider} needs {needed} to be set"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DEXORDER_PORT", "http"),
        ("DEXORDER_PROVISIONER", "docker"),
        ("DEXORDER_AGENTS_NAMESPACE", "Not_A_Namespace"),
        ("DEXORDER_JWT_LEEWAY_SECONDS", "3600"),
        ("DEXORDER_JWKS_URL", "file:///etc/jwks.json"),
        ("DEFAULT_MODEL_PROVIDER", "skynet"),
        ("DATABASE_URL", "mysql://db/dexorder"),
        ("OLLAMA_URL", "localhost:11434"),
    ],
)
def test_bad_values_are_named(env: pytest.MonkeyPatch, name: str, value: str) -> None:
    env.setenv(name, value)

    with pytest.raises(SettingsError) as refused:
        load_settings(env_file=None)

    assert problems_of(refused).startswith(f"{name}: ")


def test_secrets_do_not_show_in_the_repr(env: pytest.MonkeyPatch) -> None:
    env.setenv("OPENAI_API_KEY", "sk-very-secret")
    env.setenv("REDIS_URL", "redis://:hunter2@127.0.0.1:6379")

    text = repr(load_settings(env_file=None))

    assert "sk-very-secret" not in text
    assert "hunter2" not in text
    assert "secret@127.0.0.1" not in text


def test_from_values_ignores_the_environment(env: pytest.MonkeyPatch) -> None:
    env.setenv("DEXORDER_PORT", "9999")
    env.setenv("REDIS_URL", "redis://127.0.0.1:1")

    settings = GatewaySettings.from_values(
        {
            "database_url": "postgresql://127.0.0.1/dexorder",
            "jwt_issuer": "issuer",
            "jwt_audience": "audience",
            "DEXORDER_DEV_HS256_SECRET": "s" * 32,
            "port": 0,
        }
    )

    assert settings.jwt_issuer == "issuer"
    assert settings.port == 0
    assert settings.redis_url is None
    assert settings.jwks_url is None
    assert load_settings(env_file=None).port == 9999


def test_from_values_validates_too() -> None:
    with pytest.raises(ValidationError, match="DEXORDER_JWKS_URL is required"):
        GatewaySettings.from_values(
            {"database_url": "postgresql://x/y", "jwt_issuer": "i", "jwt_audience": "a"}
        )


def test_env_names() -> None:
    assert env_name("database_url") == "DATABASE_URL"
    assert env_name("kubeconfig") == "DEXORDER_KUBECONFIG"
    assert env_name("jwks_url") == "DEXORDER_JWKS_URL"


def test_the_tier_catalog_is_read_from_its_path(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("DEXORDER_TIERS_PATH", str(REPO / "config" / "tiers.yaml"))
    assert load_tier_catalog(load_settings(env_file=None)).names == ("free", "pro", "enterprise")

    env.setenv("DEXORDER_TIERS_PATH", str(tmp_path / "missing.yaml"))
    with pytest.raises(SettingsError, match="DEXORDER_TIERS_PATH: cannot read"):
        load_tier_catalog(load_settings(env_file=None))

    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\ntiers: {}\n")
    env.setenv("DEXORDER_TIERS_PATH", str(broken))
    with pytest.raises(SettingsError, match=r"DEXORDER_TIERS_PATH: .*broken\.yaml: tiers"):
        load_tier_catalog(load_settings(env_file=None))


def test_the_example_env_file_names_every_setting() -> None:
    example = (REPO / ".env.example").read_text()

    for field in GatewaySettings.model_fields:
        assert env_name(field) in example, env_name(field)


def test_one_shared_external_mcp_token_is_refused(env: pytest.MonkeyPatch) -> None:
    env.setenv("DEXORDER_EXTERNAL_MCP_TOKEN", "t" * 40)
    with pytest.raises(SettingsError, match="DEXORDER_EXTERNAL_MCP_TOKEN is no longer used"):
        load_settings(env_file=None)


def test_the_external_mcp_secret_must_be_long(env: pytest.MonkeyPatch) -> None:
    env.setenv("DEXORDER_EXTERNAL_MCP_SECRET", "s" * 31)
    with pytest.raises(SettingsError, match="EXTERNAL_MCP_SECRET must be at least 32"):
        load_settings(env_file=None)
    env.setenv("DEXORDER_EXTERNAL_MCP_SECRET", "s" * 32)
    assert load_settings(env_file=None).external_mcp_secret is not None


@pytest.mark.parametrize(
    ("url", "accepted"),
    [
        ("https://id.example.com/.well-known/jwks.json", True),
        ("http://127.0.0.1:8000/jwks.json", True),
        ("http://localhost/jwks.json", True),
        ("http://[::1]:9000/jwks.json", True),
        ("http://id.example.com/.well-known/jwks.json", False),
        ("http://10.0.0.5/jwks.json", False),
        ("http://127.0.0.1.example.com/jwks.json", False),
    ],
)
def test_the_jwks_must_come_over_https_except_on_loopback(
    env: pytest.MonkeyPatch, url: str, accepted: bool
) -> None:
    env.setenv("DEXORDER_JWKS_URL", url)
    if accepted:
        assert load_settings(env_file=None).jwks_url == url
    else:
        with pytest.raises(SettingsError, match="DEXORDER_JWKS_URL must be https"):
            load_settings(env_file=None)


def test_demo_mode_is_refused_unless_bound_to_loopback(env: pytest.MonkeyPatch) -> None:
    env.delenv("DEXORDER_JWKS_URL")
    env.setenv("DEXORDER_DEV_HS256_SECRET", "d" * 32)
    env.setenv("DEXORDER_DEMO_MODE", "true")
    env.setenv("DEXORDER_HOST", "0.0.0.0")
    with pytest.raises(SettingsError, match="DEXORDER_HOST on loopback"):
        load_settings(env_file=None)
    env.setenv("DEXORDER_HOST", "127.0.0.1")
    assert load_settings(env_file=None).demo_mode


def test_the_development_secret_is_refused_with_the_kubernetes_provisioner(
    env: pytest.MonkeyPatch,
) -> None:
    env.delenv("DEXORDER_JWKS_URL")
    env.setenv("DEXORDER_DEV_HS256_SECRET", "d" * 32)
    env.setenv("DEXORDER_PROVISIONER", "kubernetes")
    with pytest.raises(SettingsError, match="cannot be used with DEXORDER_PROVISIONER=kub"):
        load_settings(env_file=None)
    env.setenv("DEXORDER_DEV_SECRET_WITH_KUBERNETES", "true")  # a test cluster, said so
    assert load_settings(env_file=None).dev_hs256_secret is not None


@pytest.mark.parametrize(
    ("secret", "accepted"),
    [
        ("a" * 32, True),
        ("Ab0_-" * 7, True),
        ("x" * 256, True),
        ("a" * 31, False),
        ("x" * 257, False),
        ("a" * 31 + "!", False),  # outside Telegram's alphabet
        ("short", False),
    ],
)
def test_the_telegram_webhook_secret_must_be_strong(
    env: pytest.MonkeyPatch, secret: str, accepted: bool
) -> None:
    env.setenv("TELEGRAM_BOT_TOKEN", "123:abc")
    env.setenv("DEXORDER_TELEGRAM_WEBHOOK_SECRET", secret)
    if accepted:
        assert load_settings(env_file=None).telegram_webhook_secret is not None
    else:
        with pytest.raises(SettingsError, match="WEBHOOK_SECRET must be 32 to 256 characters"):
            load_settings(env_file=None)
