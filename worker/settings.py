"""Runtime configuration, read only at the edges (app factory, CLI, Celery app).

Nothing below the edges reads the environment: they receive explicit arguments.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite:///./var/loyalty.db"
MIB = 1024 * 1024


class Settings(BaseSettings):
    """Environment variables (and `.env`) of the service."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    database_url: str = Field(default=DEFAULT_DATABASE_URL, alias="DATABASE_URL")
    wallet_base_url: str = Field(default="http://127.0.0.1:8000", alias="WALLET_BASE_URL")
    log_format: Literal["json", "console"] = Field(default="json", alias="LOG_FORMAT")
    log_level: str = Field(default="INFO", alias="LOG_LEVEL")
    api_host: str = Field(default="127.0.0.1", alias="API_HOST")
    api_port: int = Field(default=8000, alias="API_PORT", ge=1, le=65535)
    db_pool_size: int = Field(default=10, alias="DB_POOL_SIZE", ge=1)
    # Shared state for workers (rate budgets, locks); in-process equivalents when unset.
    redis_url: str | None = Field(default=None, alias="REDIS_URL")
    # Celery broker (e.g. redis://127.0.0.1:6379/0); unset → SQLite broker file under ./var/.
    celery_broker_url: str | None = Field(default=None, alias="CELERY_BROKER_URL")
    # Foreign API versions are pinned: payload shapes change between versions.
    shopify_api_version: str = Field(default="2026-10", alias="SHOPIFY_API_VERSION")
    square_version: str = Field(default="2026-08-19", alias="SQUARE_VERSION")
    # Encrypts connection credentials at rest; unset → a key generated once into ./var/secret.key.
    secret_key: str | None = Field(default=None, alias="SECRET_KEY")
    # Webhook intake. An empty secret/key disables its endpoint (404); it never means "open".
    # Comma-separated Shopify app secrets: any one verifies, so a secret can be rotated.
    shopify_api_secrets: SecretStr = Field(default=SecretStr(""), alias="SHOPIFY_API_SECRETS")
    # The notification URL exactly as configured in the Square subscription (it is signed).
    square_webhook_url: str = Field(default="", alias="SQUARE_WEBHOOK_URL")
    square_webhook_signature_key: SecretStr = Field(
        default=SecretStr(""), alias="SQUARE_WEBHOOK_SIGNATURE_KEY"
    )
    webhook_max_bytes: int = Field(default=MIB, alias="WEBHOOK_MAX_BYTES", ge=1)
    # Group commit: deliveries arriving together share one INSERT and one commit.
    webhook_batch_max_rows: int = Field(default=200, alias="WEBHOOK_BATCH_MAX_ROWS", ge=1, le=1000)
    webhook_batch_wait_ms: float = Field(default=2.0, alias="WEBHOOK_BATCH_WAIT_MS", ge=0, le=1000)
    # How long a shop domain / merchant id → connection look-up (hit or miss) is reused.
    # A claimed inbox row whose worker did not finish within this long is re-driven by the sweep.
    webhook_lease_seconds: float = Field(default=300.0, alias="WEBHOOK_LEASE_SECONDS", gt=0)
    webhook_route_cache_seconds: float = Field(
        default=5.0, alias="WEBHOOK_ROUTE_CACHE_SECONDS", ge=0
    )

    # --- worker schedules (Celery beat) --------------------------------------------------------
    # Default interval of a connection's incremental customer sync (a connection's config may
    # set its own `sync_interval_seconds`); each is jittered so connections don't pull in step.
    sync_interval_seconds: float = Field(default=900.0, alias="SYNC_INTERVAL_SECONDS", gt=0)
    # How often beat checks which connections are due (the intervals above are per connection).
    sync_dispatch_seconds: float = Field(default=60.0, alias="SYNC_DISPATCH_SECONDS", gt=0)
    reconcile_interval_seconds: float = Field(
        default=3600.0, alias="RECONCILE_INTERVAL_SECONDS", gt=0
    )
    # How far back stamp reconciliation re-pulls orders/payments.
    reconcile_window_hours: float = Field(default=72.0, alias="RECONCILE_WINDOW_HOURS", gt=0)
    outbox_interval_seconds: float = Field(default=30.0, alias="OUTBOX_INTERVAL_SECONDS", gt=0)
    sweep_interval_seconds: float = Field(default=60.0, alias="SWEEP_INTERVAL_SECONDS", gt=0)
    # Handled webhook events older than this are deleted by the retention task.
    event_retention_days: float = Field(default=30.0, alias="EVENT_RETENTION_DAYS", gt=0)
    # --- outbox delivery ---------------------------------------------------------------------
    # e.g. smtp://user:pass@host:587?starttls=true (smtps:// for implicit TLS); unset → email off.
    smtp_url: SecretStr | None = Field(default=None, alias="SMTP_URL")
    smtp_from: str = Field(default="loyalty@localhost", alias="SMTP_FROM")
    # Twilio-style HTTP SMS provider (form POST To/From/Body, bearer/basic token); unset → off.
    sms_api_url: str | None = Field(default=None, alias="SMS_API_URL")
    sms_api_token: SecretStr | None = Field(default=None, alias="SMS_API_TOKEN")
    sms_from: str | None = Field(default=None, alias="SMS_FROM")
    # pass_update / push rows are POSTed here, signed with PASS_SERVICE_SECRET; unset → skipped.
    pass_service_url: str | None = Field(default=None, alias="PASS_SERVICE_URL")
    pass_service_secret: SecretStr | None = Field(default=None, alias="PASS_SERVICE_SECRET")
    outbox_max_attempts: int = Field(default=8, alias="OUTBOX_MAX_ATTEMPTS", ge=1, le=100)
    # Write-back of the card URL into the sources.
    shopify_metafield_namespace: str = Field(
        default="$app:loyalty", alias="SHOPIFY_METAFIELD_NAMESPACE"
    )
    square_card_attribute_key: str = Field(
        default="loyalty-card-url", alias="SQUARE_CARD_ATTRIBUTE_KEY"
    )
    # --- observability -----------------------------------------------------------------------
    # The worker's Prometheus exporter port (0 = no exporter); the API serves /metrics itself.
    metrics_port: int = Field(default=0, alias="METRICS_PORT", ge=0, le=65535)

    def shopify_secrets(self) -> tuple[str, ...]:
        """The configured Shopify secrets (blank entries dropped; empty = endpoint disabled)."""
        raw = self.shopify_api_secrets.get_secret_value()
        return tuple(part.strip() for part in raw.split(",") if part.strip())

    @field_validator("wallet_base_url")
    @classmethod
    def _strip_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")
