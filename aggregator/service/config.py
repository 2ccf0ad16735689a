"""Aggregator settings: flags of `gradwatch aggregator`, or GRADWATCH_AGGREGATOR_* variables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

from pydantic import AnyHttpUrl, BeforeValidator, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..rules.specs import parse_duration

Seconds = Annotated[int, BeforeValidator(parse_duration), Field(gt=0)]


def _none_word(value: object) -> object:
    return None if isinstance(value, str) and value.strip().lower() in ("", "none") else value


# The token unlocks halt and scale-LR on every job: a short or placeholder one (deploy/kubernetes's
# aggregator-secret.yaml ships `REPLACE-ME-...`) must stop the service, not quietly protect nothing.
MIN_TOKEN_LENGTH = 16
PLACEHOLDER_PREFIX = "REPLACE-ME"


class AggregatorSettings(BaseSettings):
    # hide_input_in_errors: a refused token must not be echoed to the log.
    model_config = SettingsConfigDict(env_prefix="GRADWATCH_AGGREGATOR_", extra="forbid", hide_input_in_errors=True)

    prometheus_url: AnyHttpUrl = AnyHttpUrl("http://127.0.0.1:9090")
    scrape: list[AnyHttpUrl] = Field(default_factory=list, description="no Prometheus: evaluate over these agents' /metrics URLs, scraped once per round")
    alertmanager_url: Annotated[Optional[AnyHttpUrl], BeforeValidator(_none_word)] = Field(
        AnyHttpUrl("http://127.0.0.1:9093"), description="`none`: no paging, alerts are served by the API only")
    rules: Optional[Path] = Field(None, description="rules YAML overriding the built-in thresholds")
    state: Path = Field(Path("gradwatch-aggregator.sqlite"), description="SQLite file holding alert state across restarts")
    host: str = "127.0.0.1"
    port: int = Field(9095, ge=0, le=65535)
    eval_interval: Optional[Seconds] = Field(None, description="default: the rule set's interval")
    resend_interval: Seconds = Field(60, description="how often firing alerts are re-sent to Alertmanager")
    timeout: Seconds = Field(10, description="HTTP timeout towards Prometheus and Alertmanager")
    max_backoff: Seconds = Field(60, description="longest wait between retries while Alertmanager is down")
    external_url: Optional[str] = Field(None, description="base of each alert's generatorURL (default: this service)")
    token: Optional[SecretStr] = Field(None, description="bearer token for the command and audit endpoints (unset: they answer 503)")

    @field_validator("token")
    @classmethod
    def _real_token(cls, token: Optional[SecretStr]) -> Optional[SecretStr]:
        if token is None:
            return None
        value = token.get_secret_value()
        if value.startswith(PLACEHOLDER_PREFIX):
            raise ValueError(f"the token is the {PLACEHOLDER_PREFIX}... placeholder: set a random one, "
                             "e.g. `openssl rand -hex 32`")
        if len(value) < MIN_TOKEN_LENGTH:
            raise ValueError(f"the token has {len(value)} characters, at least {MIN_TOKEN_LENGTH} are needed: "
                             "set a random one, e.g. `openssl rand -hex 32`")
        return token

    def base(self, url: AnyHttpUrl) -> str:
        return str(url).rstrip("/")
