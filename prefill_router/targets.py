"""Target models as OpenAI-compatible endpoints: one config format shared by `collect` and `serve`.

A targets file is YAML or TOML:

    targets:
      - name: gpt-4o                    # the name routers, datasets and price tables use
        base_url: https://api.example.com/v1
        model: gpt-4o-2024-08-06        # the upstream's own model name (defaults to name)
        api_key_env: OPENAI_API_KEY     # read from the environment, never stored in the file
        usd_per_m_input: 2.5
        usd_per_m_output: 10.0
        timeout_s: 60
        max_concurrency: 8              # optional, used by `collect`: requests in flight at once
        requests_per_second: 5          # optional, used by `collect`
        tokens_per_minute: 200000       # optional, used by `collect` (input + output tokens)
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from prefill_router.errors import ConfigError, invalid_config


class TargetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    base_url: str = Field(min_length=1)
    model: str | None = None
    api_key_env: str | None = None
    usd_per_m_input: float = Field(default=0.0, ge=0)
    usd_per_m_output: float = Field(default=0.0, ge=0)
    timeout_s: float = Field(default=60.0, gt=0)
    # Client-side limits for label collection (`prefill-router collect`); None: its default, or no limit.
    max_concurrency: int | None = Field(default=None, ge=1)
    requests_per_second: float | None = Field(default=None, gt=0)
    tokens_per_minute: int | None = Field(default=None, gt=0)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ConfigError("must start with http:// or https://")
        return v.rstrip("/")

    @property
    def upstream_model(self) -> str:
        return self.model or self.name

    def api_key(self) -> str | None:
        """The key from the environment variable the config names; None when no variable is named."""
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env)
        if key is None:
            raise ConfigError(f"target '{self.name}': environment variable {self.api_key_env} is not set")
        return key


def read_config_file(path: str | Path) -> dict:
    """Read a YAML or TOML file into a dict, with an error that names the file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: file not found")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(path.read_text())
        else:
            data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot parse: {' '.join(str(exc).split())}") from exc  # one line
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def validation_message(path: str | Path, exc: ValidationError) -> str:
    """Pydantic's errors, one per line, each naming the dotted field path."""
    return str(invalid_config(f"{path}: invalid configuration", exc))


def parse_targets(data: dict, path: str | Path = "<config>") -> list[TargetConfig]:
    class _File(BaseModel):
        model_config = ConfigDict(extra="allow")
        targets: list[TargetConfig] = Field(min_length=1)

    try:
        targets = _File.model_validate(data).targets
    except ValidationError as exc:
        raise ConfigError(validation_message(path, exc)) from exc
    names = [t.name for t in targets]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{path}: targets: duplicate name(s) {dupes}")
    return targets


def load_targets(path: str | Path) -> list[TargetConfig]:
    return parse_targets(read_config_file(path), path)
