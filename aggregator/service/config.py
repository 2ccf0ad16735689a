"""Aggregator settings: flags of `gradwatch aggregator`, or GRADWATCH_AGGREGATOR_* variables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

from pydantic import AnyHttpUrl, BeforeValidator, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..rules.specs import parse_duration

Seconds = Annotated[int, BeforeValidator(parse_duration), Field(gt=0)]


class AggregatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GRADWATCH_AGGREGATOR_", extra="forbid")

    prometheus_url: AnyHttpUrl = AnyHttpUrl("http://127.0.0.1:9090")
    alertmanager_url: AnyHttpUrl = AnyHttpUrl("http://127.0.0.1:9093")
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

    def base(self, url: AnyHttpUrl) -> str:
        return str(url).rstrip("/")
