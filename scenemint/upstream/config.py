"""The configured upstreams: `SCENEMINT_UPSTREAMS_FILE` (a TOML file of `[[upstream]]`
tables), or today's variables (`CHATGPT2API_*`, `SCENEMINT_UPSTREAM_KIND`, ...) as one
upstream named `default`.

    [[upstream]]
    name = "pool-a"             # unique; recorded on every task sent there
    kind = "chatgpt2api"        # or "openai"
    base_url = "http://127.0.0.1:3200"
    api_key_env = "POOL_A_KEY"  # read from this environment variable (or api_key = "...")
    image_model = "gpt-image-2"
    prompt_model = "gpt-5.5"    # optional: without one it serves no enhancement
    priority = 1                # 1 is tried before 2
    weight = 1                  # share of new tasks within its priority
    drain = false               # true: no new tasks; its unfinished ones are still followed
    # openai kind: sizes = { "16:9" = "1792x1024" }, auth = "api-key", job_concurrency = 4
    # either kind: image_hosts = ["https://cdn.example.com"]

A bad file stops the service at start-up with a message naming the file, the table and the
key (`UpstreamsError`); the key itself never appears in it, nor in `repr()`.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from ..config import (
    DEFAULT_OPENAI_SIZES,
    check_key,
    check_upstream_url,
    image_origin,
    openai_size,
    upstream_root,
)

if TYPE_CHECKING:
    from ..config import Settings

DEFAULT = "default"  # the upstream of today's variables, and of rows made before several
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class UpstreamsError(ValueError):
    """The upstreams configuration cannot be used; the message names where and why."""


class UpstreamConfig(BaseModel):
    """One upstream, validated. `api_key` is the key itself (from `api_key_env` or the file)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    kind: Literal["chatgpt2api", "openai"] = "chatgpt2api"
    base_url: str
    api_key: SecretStr | None = Field(default=None, repr=False)
    api_key_env: str | None = None
    image_model: str = "gpt-image-2"
    prompt_model: str | None = None
    priority: int = Field(default=1, ge=1, le=1000)
    weight: int = Field(default=1, ge=1, le=1_000_000)
    drain: bool = False
    sizes: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_OPENAI_SIZES))
    auth: Literal["bearer", "api-key"] = "bearer"
    image_hosts: list[str] = Field(default_factory=list)
    job_concurrency: int = Field(default=4, ge=1, le=256)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError(
                "must be 1 to 64 letters, digits, '.', '_' or '-' (it names metrics and logs)"
            )
        return value

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        check_upstream_url(value)
        return value.strip()

    @field_validator("api_key")
    @classmethod
    def _usable_key(cls, value: SecretStr | None) -> SecretStr | None:
        return check_key(value)

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.fullmatch(value):
            raise ValueError("must be the name of an environment variable")
        return value

    @field_validator("image_model", "prompt_model")
    @classmethod
    def _model(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            return None
        return value.strip() if value is not None else None

    @field_validator("sizes", mode="before")
    @classmethod
    def _sizes(cls, value: object) -> object:
        if not isinstance(value, dict):
            return value
        sizes = dict(DEFAULT_OPENAI_SIZES)
        for ours, theirs in value.items():
            if not isinstance(theirs, str):
                raise ValueError(f"{ours!r}: the size must be a string like 1536x1024")
            sizes[str(ours)] = openai_size(str(ours), theirs)
        return sizes

    @field_validator("image_hosts", mode="before")
    @classmethod
    def _hosts(cls, value: object) -> object:
        if isinstance(value, list):
            return [image_origin(host) if isinstance(host, str) else host for host in value]
        return value

    @property
    def root(self) -> str:
        root = upstream_root(self.base_url)
        assert root is not None  # validated
        return root

    @property
    def key(self) -> str | None:
        if self.api_key is None:
            return None
        return self.api_key.get_secret_value().strip() or None

    def described(self) -> dict[str, Any]:
        """What may be shown and remembered of it: everything but the key itself."""
        return self.model_dump(mode="json", exclude={"api_key"})


def load_upstreams(
    settings: Settings, *, environ: dict[str, str] | None = None
) -> list[UpstreamConfig]:
    """The upstreams of `settings`: the file's, or one named `default` from the variables
    (none when they name no upstream). Raises UpstreamsError, naming what is wrong."""
    env = os.environ if environ is None else environ
    if settings.upstreams_file is not None:
        return read_file(settings.upstreams_file, env)
    if not settings.upstream_configured:
        return []
    assert settings.upstream_base_url is not None and settings.api_key is not None
    return [
        UpstreamConfig(
            name=DEFAULT,
            kind=settings.upstream_kind,
            base_url=settings.upstream_base_url,
            api_key=SecretStr(settings.api_key),
            api_key_env="CHATGPT2API_API_KEY",
            image_model=settings.image_model,
            prompt_model=settings.prompt_model,
            sizes=settings.openai_sizes,
            auth=settings.openai_auth,
            image_hosts=settings.image_hosts,
            job_concurrency=settings.job_concurrency,
        )
    ]


def read_file(path: Path, environ: dict[str, str] | os._Environ[str]) -> list[UpstreamConfig]:
    where = f"SCENEMINT_UPSTREAMS_FILE {path}"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UpstreamsError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UpstreamsError(f"{where}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"upstream"})
    if unknown:
        raise UpstreamsError(f"{where}: unknown table or key {unknown[0]!r} (only [[upstream]])")
    tables = data.get("upstream")
    if not isinstance(tables, list) or not tables:
        raise UpstreamsError(f"{where}: no [[upstream]] table")
    upstreams: list[UpstreamConfig] = []
    for number, table in enumerate(tables, 1):
        name = table.get("name") if isinstance(table.get("name"), str) else None
        label = f"{where}: [[upstream]] #{number}" + (f" ({name})" if name else "")
        upstreams.append(_one(table, label, environ))
    names = [upstream.name for upstream in upstreams]
    for name in names:
        if names.count(name) > 1:
            raise UpstreamsError(f"{where}: name {name!r} is used by more than one [[upstream]]")
    if all(upstream.drain for upstream in upstreams):
        raise UpstreamsError(f"{where}: every upstream is drained: none can take a new task")
    return upstreams


def _one(
    table: dict[str, Any], label: str, environ: dict[str, str] | os._Environ[str]
) -> UpstreamConfig:
    values = dict(table)
    if "api_key" in values and "api_key_env" in values:
        raise UpstreamsError(f"{label}: give api_key or api_key_env, not both")
    env_name = values.get("api_key_env")
    if "api_key" not in values:
        if not isinstance(env_name, str):
            raise UpstreamsError(f"{label}: api_key_env: missing (or api_key)")
        if env_name not in environ or not environ[env_name].strip():
            raise UpstreamsError(f"{label}: api_key_env: the variable {env_name} is not set")
        values["api_key"] = environ[env_name]
    try:
        return UpstreamConfig.model_validate(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in error["loc"]) or "?"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "not a key of [[upstream]]"
        elif error["type"] == "missing":
            message = "missing"
        raise UpstreamsError(f"{label}: {key}: {message}") from None
