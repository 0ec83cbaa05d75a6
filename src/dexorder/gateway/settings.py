"""The gateway's one settings object, read once at start-up and passed down.

The Node gateway's variable names are kept as they were (``DATABASE_URL``,
``ANTHROPIC_API_KEY``, ``DEFAULT_MODEL``, ...); everything new is prefixed ``DEXORDER_``.
Values come from the environment, then from an optional ``.env`` file.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from contextvars import ContextVar
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    AliasChoices,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from dexorder.core.tiers import TierCatalog, TierCatalogError, parse_tier_catalog
from dexorder.gateway.pure.credentials import MIN_SECRET_LENGTH

ENV_PREFIX = "DEXORDER_"
# Set while GatewaySettings.from_values builds settings from explicit values only.
_EXPLICIT_ONLY: ContextVar[bool] = ContextVar("explicit_settings_only", default=False)
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"


class SettingsError(ValueError):
    """The configuration cannot start the gateway; each problem names its variable."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid gateway configuration:\n  " + "\n  ".join(problems))
        self.problems = problems


class ModelProvider(StrEnum):
    ANTHROPIC = "anthropic"
    OPENAI = "openai"
    GEMINI = "gemini"
    OPENROUTER = "openrouter"
    OLLAMA = "ollama"


class ProvisionerKind(StrEnum):
    KUBERNETES = "kubernetes"
    LOCAL = "local"


def _empty_is_none(value: Any) -> Any:
    # An empty line in .env (`REDIS_URL=`) means "not set", not "the empty string".
    return None if isinstance(value, str) and not value.strip() else value


def _provider_name(value: Any) -> Any:
    value = _empty_is_none(value)
    # The seed calls Gemini by its key's name; LiteLLM calls it gemini.
    if isinstance(value, str) and value.strip().lower() == "google":
        return ModelProvider.GEMINI
    return value.strip().lower() if isinstance(value, str) else value


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http(s) URL, got {value!r}")
    return value


_TELEGRAM_SECRET = re.compile(r"[A-Za-z0-9_-]{32,256}")


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _https_or_loopback(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme == "https" or is_loopback_host(parts.hostname or "")


def _database_url(value: str) -> str:
    if "://" in value and urlsplit(value).scheme not in ("postgresql", "postgres"):
        raise ValueError("expected a postgresql:// URL or a libpq connection string")
    return value


EmptyIsNone = BeforeValidator(_empty_is_none)
HttpUrlText = Annotated[str, AfterValidator(_http_url)]


def _seed(name: str) -> Any:
    """A variable the Node gateway already used: read without the prefix."""
    return AliasChoices(name, name.lower())


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        frozen=True,
    )

    # --- the seed's variables --------------------------------------------------------
    database_url: Annotated[str, AfterValidator(_database_url)] = Field(
        # repr=False: connection URLs often carry a password.
        validation_alias=_seed("DATABASE_URL"),
        min_length=1,
        repr=False,
    )
    anthropic_api_key: Annotated[SecretStr | None, EmptyIsNone] = Field(
        None, validation_alias=_seed("ANTHROPIC_API_KEY")
    )
    openai_api_key: Annotated[SecretStr | None, EmptyIsNone] = Field(
        None, validation_alias=_seed("OPENAI_API_KEY")
    )
    google_api_key: Annotated[SecretStr | None, EmptyIsNone] = Field(
        None, validation_alias=_seed("GOOGLE_API_KEY")
    )
    openrouter_api_key: Annotated[SecretStr | None, EmptyIsNone] = Field(
        None, validation_alias=_seed("OPENROUTER_API_KEY")
    )
    default_model_provider: Annotated[ModelProvider | None, BeforeValidator(_provider_name)] = (
        Field(None, validation_alias=_seed("DEFAULT_MODEL_PROVIDER"))
    )
    default_model: Annotated[str | None, EmptyIsNone] = Field(
        None, validation_alias=_seed("DEFAULT_MODEL")
    )
    ollama_url: Annotated[HttpUrlText | None, EmptyIsNone] = Field(
        None, validation_alias=_seed("OLLAMA_URL")
    )
    redis_url: Annotated[str | None, EmptyIsNone] = Field(
        None, validation_alias=_seed("REDIS_URL"), repr=False
    )
    # Bounded waits on Redis, and its pool (see stores/redis_client.py): the socket timeout
    # must outlast the longest blocking read (about a second).
    redis_socket_timeout_seconds: float = Field(5.0, gt=1.0)
    redis_connect_timeout_seconds: float = Field(2.0, gt=0)
    redis_max_connections: int = Field(512, ge=8)
    kafka_bootstrap: Annotated[str | None, EmptyIsNone] = Field(
        None, validation_alias=_seed("KAFKA_BOOTSTRAP")
    )

    # --- authentication --------------------------------------------------------------
    jwks_url: Annotated[HttpUrlText | None, EmptyIsNone] = None
    jwt_issuer: str = Field(min_length=1)
    jwt_audience: str = Field(min_length=1)
    jwt_leeway_seconds: int = Field(30, ge=0, le=300)
    # An unknown `kid` refetches the JWKS at most this often, so junk tokens cannot
    # turn the gateway into a load generator against the identity provider.
    jwks_min_refetch_seconds: float = Field(30.0, gt=0)
    # Known keys are refreshed this often, so a key the provider withdrew stops working.
    jwks_cache_seconds: float = Field(600.0, gt=0)
    # Development only: a shared HS256 secret instead of a JWKS. Never both.
    dev_hs256_secret: Annotated[SecretStr | None, EmptyIsNone] = None

    # --- licenses --------------------------------------------------------------------
    auto_enroll: bool = True
    license_cache_seconds: float = Field(30.0, ge=0)
    # An open socket reads its user's license again this often: withdrawn, it closes (4403).
    license_recheck_seconds: float = Field(300.0, gt=0)

    # --- provisioning ----------------------------------------------------------------
    provisioner: ProvisionerKind = ProvisionerKind.LOCAL
    agents_namespace: str = Field("dexorder-agents", pattern=_DNS_LABEL)
    # None: in-cluster configuration. The standard KUBECONFIG is honoured too.
    kubeconfig: Annotated[Path | None, EmptyIsNone] = Field(
        None, validation_alias=AliasChoices("DEXORDER_KUBECONFIG", "KUBECONFIG", "kubeconfig")
    )
    provision_timeout_seconds: float = Field(120.0, gt=0)
    # The Kubernetes provisioner creates no new UserAgent once the namespace holds this many
    # (None: no cap); the user is told so (an `agents_at_capacity` error frame).
    max_agents: Annotated[int | None, EmptyIsNone] = Field(None, ge=1)
    # How often a running turn re-records its agent's activity (and the least time between
    # two activity writes for one user): well under the shortest idle timeout.
    agent_activity_seconds: float = Field(60.0, gt=0)
    # Model routing (gateway/llm/routing.py): per-deployment timeout, walks of a route, backoff, cooldown.
    llm_timeout_seconds: float = Field(60.0, gt=0)
    # A turn's deadlines, whatever the model's connection does (keep-alive comments do not
    # extend them): until its reply begins, and in all.
    turn_first_token_seconds: float = Field(120.0, gt=0)
    turn_deadline_seconds: float = Field(600.0, gt=0)
    # A tool's result past this many bytes is cut (in frames, events and the model's prompt).
    tool_result_max_bytes: int = Field(64 * 1024, ge=1024)
    # The most of one answer read from an agent's MCP server; past it that call fails.
    mcp_max_answer_bytes: int = Field(4 * 1024 * 1024, ge=64 * 1024)
    llm_fallback_rounds: int = Field(2, ge=1, le=10)
    llm_backoff_seconds: float = Field(0.5, ge=0)
    llm_backoff_cap_seconds: float = Field(8.0, ge=0)
    llm_cooldown_seconds: float = Field(30.0, ge=0)
    # auto: OpenAI-compatible deployments are streamed directly (gateway/llm/wire.py), the
    # rest through litellm; litellm: every deployment through litellm.
    llm_transport: Literal["auto", "litellm"] = "auto"
    # The secret each user's credential for their own MCP server (a license's
    # mcp_server_url) is derived from: HMAC(secret, user id), gateway/pure/credentials.py.
    # The user's JWT is never sent. (The shared EXTERNAL_MCP_TOKEN of before is refused.)
    external_mcp_secret: Annotated[SecretStr | None, EmptyIsNone] = None
    external_mcp_token: Annotated[SecretStr | None, EmptyIsNone] = Field(None, exclude=True)
    # A Ready agent may not answer at once (its Service's endpoints lag): retry this long.
    agent_connect_seconds: float = Field(10.0, ge=0, le=120)
    # A read of the agent (preferences, history, tool list) that takes longer fails the
    # turn; the MCP session, shared by the user's other chats, is kept.
    agent_read_seconds: float = Field(30.0, gt=0, le=600)

    # --- the harness -----------------------------------------------------------------
    max_tool_rounds: int = Field(8, ge=1, le=50)

    # --- serving ---------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # /metrics is served on its own port, never on the public one (the chart's Ingress
    # routes only the public port); empty: no metrics endpoint; 0: any free port (tests).
    metrics_port: Annotated[int | None, EmptyIsNone] = Field(None, ge=0, le=65535)
    tiers_path: Path = Path("config/tiers.yaml")
    models_path: Path = Path("config/models.yaml")
    # Demo mode serves a token to anyone who asks: only on a loopback bind (DEXORDER_HOST),
    # and only to requests whose Host header names loopback (no DNS rebinding).
    demo_mode: bool = False
    # Browser origins (scheme://host[:port]) allowed to open /ws/chat besides the gateway's
    # own; a socket from any other page is refused with 403 before the upgrade.
    allowed_origins: list[str] = Field(default_factory=list)
    # The development HS256 secret is refused with the Kubernetes provisioner (a real
    # cluster); a test cluster or the demo's local API server says so explicitly with this.
    dev_secret_with_kubernetes: bool = False
    # The user the demo-mode token endpoint signs for (demo mode only).
    demo_user_id: str = Field("demo-user", min_length=1)
    # PostgreSQL: a connection attempt and a statement (cancelled by the server) give up
    # after these.
    database_connect_timeout_seconds: int = Field(5, ge=1, le=120)
    database_statement_timeout_seconds: float = Field(15.0, gt=0, le=600)
    # SIGTERM: running generations may finish for this long before sockets close with 1012.
    drain_seconds: float = Field(20.0, ge=0, le=600)
    # Then every socket is closed with 1012 at once, and those not closed within this
    # (clients that do not read) are aborted. The chart's grace period is the sum of its
    # preStop pause, these two, and the flush of usage and events (5 s each at most).
    ws_close_seconds: float = Field(3.0, gt=0, le=60)
    # A WebSocket client that does not read: sending may make no progress for this long,
    # and this much of frames (counted in characters) may queue behind it; past either the
    # socket is aborted (its reply goes on and stays resumable).
    ws_send_timeout_seconds: float = Field(10.0, gt=0, le=300)
    ws_send_buffer_bytes: int = Field(1 << 20, ge=64 << 10)
    max_queued_messages: int = Field(4, ge=1, le=100)
    # WebSocket connections one user may hold at once on this replica (a tier's
    # max_sockets_per_user may raise it); one more is refused with 4429.
    max_sockets_per_user: int = Field(5, ge=1, le=1000)

    # --- local agents and agent addressing -------------------------------------------
    local_agents_dir: Path = Path.home() / ".local" / "share" / "dexorder" / "agents"
    # Test and demo stand-in for cluster DNS: {"svc-host:8000": "127.0.0.1:54321"}.
    agent_host_map: dict[str, str] = Field(default_factory=dict)

    # --- Telegram (issue 7) -----------------------------------------------------------
    telegram_bot_token: Annotated[SecretStr | None, EmptyIsNone] = Field(
        None, validation_alias=_seed("TELEGRAM_BOT_TOKEN")
    )
    # The secret_token given to setWebhook; Telegram echoes it in a header on each update.
    telegram_webhook_secret: Annotated[SecretStr | None, EmptyIsNone] = None
    # Tests point aiogram at a local server speaking the Bot API.
    telegram_api_url: HttpUrlText = "https://api.telegram.org"
    # Bot API calls a second of this replica (a token bucket; a burst is a fifth of it):
    # Telegram allows a bot about 30 a second in all; divide by the replica count.
    telegram_calls_per_second: float = Field(25.0, gt=0)
    # The gateway's public base URL, for `dexorder-gateway set-webhook`.
    public_url: Annotated[HttpUrlText | None, EmptyIsNone] = None
    link_code_ttl_seconds: float = Field(600.0, gt=0)

    # --- shared sessions (issue 7) ----------------------------------------------------
    session_ttl_seconds: float = Field(3600.0, gt=0)
    # Bytes of frames kept per session so a reconnecting client gets what it missed
    # (consecutive deltas merged into one record); past it, the oldest are dropped.
    resume_buffer_bytes: int = Field(256 * 1024, ge=0, le=64 << 20)
    # How long a replica's mark "generating this session's reply" outlives its last renewal
    # (renewed every third of it): a client that reconnects elsewhere stops following a
    # replica that died mid-reply within this, and is told the reply was interrupted.
    generation_lease_seconds: float = Field(10.0, gt=0, le=300)

    # --- usage and conversation events (issue 7) -------------------------------------
    kafka_usage_topic: str = Field("dexorder.usage", min_length=1)
    kafka_conversation_topic: str = Field("dexorder.conversations", min_length=1)
    # Without KAFKA_BOOTSTRAP, events are appended here as JSON lines; with it, the
    # spool of events the broker has not yet acknowledged lives here too.
    events_dir: Path = Path.home() / ".local" / "share" / "dexorder" / "events"
    # The spool's cap in bytes on disk (its volume must hold it): past it, the oldest
    # unsent events are shed and counted (dexorder_gateway_events_shed), chat goes on.
    events_spool_max_bytes: int = Field(256 * 1024 * 1024, ge=64 * 1024)

    # --- RAG (issue 8) ----------------------------------------------------------------
    # Off by default: Qdrant's local mode locks its folder to one process, and the
    # embedded model costs ~90 MB per gateway. With QDRANT_URL, turn it on everywhere.
    rag_enabled: bool = False
    qdrant_url: Annotated[HttpUrlText | None, EmptyIsNone] = Field(
        None, validation_alias=_seed("QDRANT_URL")
    )
    # Qdrant's local mode (on disk) when no QDRANT_URL is set.
    qdrant_path: Path = Path.home() / ".local" / "share" / "dexorder" / "qdrant"
    rag_collection: str = Field("dexorder_knowledge", min_length=1)
    # Ollama's embedding model when OLLAMA_URL is set; else the embedded all-MiniLM-L6-v2.
    embedding_model: str = Field("all-minilm", min_length=1)
    rag_top_k: int = Field(5, ge=0, le=50)
    rag_score_threshold: float = Field(0.3, ge=-1.0, le=1.0)

    @field_validator("local_agents_dir", "events_dir", "qdrant_path")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        if _EXPLICIT_ONLY.get():
            return (init_settings,)
        return (init_settings, env_settings, dotenv_settings, file_secret_settings)

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> GatewaySettings:
        """Settings from ``values`` alone (field or variable names), ignoring the
        environment and any .env file: for tests and for embedding the gateway."""
        by_field = {
            name[len(ENV_PREFIX) :].lower() if name.upper().startswith(ENV_PREFIX) else name: value
            for name, value in values.items()
        }
        token = _EXPLICIT_ONLY.set(True)
        try:
            return cls.model_validate(by_field)
        finally:
            _EXPLICIT_ONLY.reset(token)

    @model_validator(mode="after")
    def _check_combinations(self) -> Self:
        problems: list[str] = []
        jwks, secret = env_name("jwks_url"), env_name("dev_hs256_secret")
        if self.jwks_url is None and self.dev_hs256_secret is None:
            problems.append(f"{jwks} is required (or, for development only, {secret})")
        if self.jwks_url is not None and self.dev_hs256_secret is not None:
            problems.append(f"{jwks} and {secret} are both set; set only one")
        if self.demo_mode and not is_loopback_host(self.host):
            problems.append(
                f"{env_name('demo_mode')} hands a token to anyone who asks: it needs "
                f"{env_name('host')} on loopback (127.0.0.1, ::1 or localhost), not {self.host!r}"
            )
        if (
            self.dev_hs256_secret is not None
            and self.provisioner == ProvisionerKind.KUBERNETES
            and not self.dev_secret_with_kubernetes
        ):
            problems.append(
                f"{secret} is for development and cannot be used with "
                f"{env_name('provisioner')}=kubernetes: set {jwks} (a test cluster may set "
                f"{env_name('dev_secret_with_kubernetes')}=true)"
            )
        if self.jwks_url is not None and not _https_or_loopback(self.jwks_url):
            problems.append(
                f"{jwks} must be https (plain http only on loopback): the keys that sign "
                "users' tokens must not be swappable on the way"
            )
        if self.dev_hs256_secret is not None and len(self.dev_hs256_secret) < 32:
            problems.append(f"{secret} must be at least 32 characters")
        provider = self.default_model_provider
        if provider is not None:
            needed = _PROVIDER_NEEDS[provider]
            if getattr(self, needed) is None:
                problems.append(
                    f"DEFAULT_MODEL_PROVIDER={provider.value} needs {env_name(needed)} to be set"
                )
        if self.external_mcp_token is not None:
            problems.append(
                f"{env_name('external_mcp_token')} is no longer used: one token for every "
                f"user's own MCP server let each user reach the others'. Set "
                f"{env_name('external_mcp_secret')} instead; each user's server then checks "
                "its own credential (docs/security.md)"
            )
        mcp_secret = self.external_mcp_secret
        if mcp_secret is not None and len(mcp_secret) < MIN_SECRET_LENGTH:
            problems.append(
                f"{env_name('external_mcp_secret')} must be at least {MIN_SECRET_LENGTH} characters"
            )
        webhook_secret = self.telegram_webhook_secret
        if webhook_secret is not None and (
            _TELEGRAM_SECRET.fullmatch(webhook_secret.get_secret_value()) is None
        ):
            problems.append(
                f"{env_name('telegram_webhook_secret')} must be 32 to 256 characters of "
                "A-Z a-z 0-9 _ - (what Telegram allows; it is all that tells Telegram's "
                "updates from anyone's)"
            )
        if (self.telegram_bot_token is None) != (self.telegram_webhook_secret is None):
            problems.append(
                f"{env_name('telegram_bot_token')} and {env_name('telegram_webhook_secret')}"
                " must be set together"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def provider_settings(self) -> dict[str, str | None]:
        """The provider settings a model list refers to, by their environment names."""

        def secret(value: SecretStr | None) -> str | None:
            return None if value is None else value.get_secret_value()

        return {
            "ANTHROPIC_API_KEY": secret(self.anthropic_api_key),
            "OPENAI_API_KEY": secret(self.openai_api_key),
            "GOOGLE_API_KEY": secret(self.google_api_key),
            "OPENROUTER_API_KEY": secret(self.openrouter_api_key),
            "OLLAMA_URL": self.ollama_url,
        }

    def provider_api_key(self, provider: ModelProvider) -> str | None:
        """The API key for ``provider`` (None for Ollama, which needs a URL instead)."""
        secret = {
            ModelProvider.ANTHROPIC: self.anthropic_api_key,
            ModelProvider.OPENAI: self.openai_api_key,
            ModelProvider.GEMINI: self.google_api_key,
            ModelProvider.OPENROUTER: self.openrouter_api_key,
            ModelProvider.OLLAMA: None,
        }[provider]
        return None if secret is None else secret.get_secret_value()


_PROVIDER_NEEDS: dict[ModelProvider, str] = {
    ModelProvider.ANTHROPIC: "anthropic_api_key",
    ModelProvider.OPENAI: "openai_api_key",
    ModelProvider.GEMINI: "google_api_key",
    ModelProvider.OPENROUTER: "openrouter_api_key",
    ModelProvider.OLLAMA: "ollama_url",
}


def env_name(field: str) -> str:
    """The environment variable that sets ``field``."""
    info = GatewaySettings.model_fields.get(field)
    if info is not None and isinstance(info.validation_alias, AliasChoices):
        first = info.validation_alias.choices[0]
        if isinstance(first, str):
            return first
    return ENV_PREFIX + field.upper()


def _problem_lines(error: ValidationError) -> list[str]:
    lines = []
    for problem in error.errors():
        message = str(problem["msg"]).removeprefix("Value error, ")
        if not problem["loc"]:
            lines.extend(message.split("; "))
            continue
        where = str(problem["loc"][0])
        name = env_name(where) if where in GatewaySettings.model_fields else where.upper()
        lines.append(f"{name}: {message}")
    return lines


def load_settings(env_file: Path | None = Path(".env")) -> GatewaySettings:
    """Read the environment (and ``env_file`` if it exists); raise ``SettingsError``."""
    try:
        return GatewaySettings(_env_file=env_file)  # type: ignore[call-arg]
    except ValidationError as error:
        raise SettingsError(_problem_lines(error)) from error


def load_tier_catalog(settings: GatewaySettings) -> TierCatalog:
    """The tier catalog named by ``DEXORDER_TIERS_PATH``."""
    name = env_name("tiers_path")
    try:
        text = settings.tiers_path.read_text(encoding="utf-8")
    except OSError as error:
        raise SettingsError([f"{name}: cannot read {settings.tiers_path}: {error}"]) from error
    try:
        return parse_tier_catalog(text, source=str(settings.tiers_path))
    except TierCatalogError as error:
        raise SettingsError([f"{name}: {error}"]) from error


__all__ = [
    "ENV_PREFIX",
    "GatewaySettings",
    "ModelProvider",
    "ProvisionerKind",
    "SettingsError",
    "env_name",
    "load_settings",
    "load_tier_catalog",
]
