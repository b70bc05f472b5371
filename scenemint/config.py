"""Settings: read once from the environment (and `.env`), validated, then passed around.

Upstream variables keep the names the original service used (`CHATGPT2API_*`,
`HOST`, `PORT`); everything of our own has the `SCENEMINT_` prefix.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_origin
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024 * 1024
DEFAULT_OPENAI_SIZES = {"1:1": "1024x1024", "16:9": "1536x1024", "9:16": "1024x1536"}
_SIZE = re.compile(r"\d{2,5}x\d{2,5}|auto")
DOCS_ASSET_FILES = ("swagger-ui-bundle.js", "swagger-ui.css")


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class Settings(BaseSettings):
    """Every knob of the service. Field names are what code uses; aliases are the env names."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        frozen=True,
        allow_inf_nan=False,  # a timeout of "inf" is a typo, not a wish
    )

    # -- upstream (chatgpt2api) ------------------------------------------------
    upstream_base_url: str | None = Field(None, validation_alias=_env("CHATGPT2API_BASE_URL"))
    upstream_api_key: SecretStr | None = Field(None, validation_alias=_env("CHATGPT2API_API_KEY"))
    image_model: str = Field("gpt-image-2", validation_alias=_env("CHATGPT2API_IMAGE_MODEL"))
    prompt_model: str = Field("gpt-5.5", validation_alias=_env("CHATGPT2API_PROMPT_MODEL"))

    upstreams_file: Path | None = Field(
        None,
        validation_alias=_env("SCENEMINT_UPSTREAMS_FILE"),
        description="a TOML file of [[upstream]] tables (several upstreams); without it the"
        " CHATGPT2API_* variables define one named default",
    )
    upstream_kind: Literal["chatgpt2api", "openai"] = Field(
        "chatgpt2api",
        validation_alias=_env("SCENEMINT_UPSTREAM_KIND"),
        description="chatgpt2api (its async task API) or openai (any OpenAI Images API)",
    )
    openai_sizes: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=lambda: dict(DEFAULT_OPENAI_SIZES),
        validation_alias=_env("SCENEMINT_OPENAI_SIZES"),
        description="our sizes as the openai kind sends them: 1:1=1024x1024,16:9=...",
    )
    openai_auth: Literal["bearer", "api-key"] = Field(
        "bearer",
        validation_alias=_env("SCENEMINT_OPENAI_AUTH"),
        description="how the key is sent: Authorization: Bearer, or api-key (Azure OpenAI)",
    )
    job_concurrency: int = Field(
        4,
        ge=1,
        le=256,
        validation_alias=_env("SCENEMINT_JOB_CONCURRENCY"),
        description="generations (openai kind) one process runs at once",
    )
    generation_timeout: float = Field(
        300.0,
        gt=0,
        validation_alias=_env("SCENEMINT_GENERATION_TIMEOUT"),
        description="the longest one synchronous generation may take (openai kind)",
    )
    job_drain_timeout: float = Field(
        60.0,
        ge=0,
        validation_alias=_env("SCENEMINT_JOB_DRAIN_TIMEOUT"),
        description="on shutdown, how long generations already sent may still finish",
    )

    # -- listening -------------------------------------------------------------
    host: str = Field("127.0.0.1", validation_alias=_env("HOST"))
    port: int = Field(3000, ge=0, le=65535, validation_alias=_env("PORT"))

    # -- storage ---------------------------------------------------------------
    data_dir: Path = Field(Path("data"), validation_alias=_env("SCENEMINT_DATA_DIR"))
    database_url: str | None = Field(
        None, repr=False, validation_alias=_env("SCENEMINT_DATABASE_URL")
    )
    quota_timezone: str = Field("UTC", validation_alias=_env("SCENEMINT_QUOTA_TIMEZONE"))

    # -- upstream connection: separate timeouts per kind of call (seconds) ------
    connect_timeout: float = Field(5.0, gt=0, validation_alias=_env("SCENEMINT_CONNECT_TIMEOUT"))
    submit_timeout: float = Field(
        60.0,
        gt=0,
        validation_alias=_env("SCENEMINT_SUBMIT_TIMEOUT"),
        description="the most a submission may take, all attempts together",
    )
    poll_timeout: float = Field(10.0, gt=0, validation_alias=_env("SCENEMINT_POLL_TIMEOUT"))
    image_first_byte_timeout: float = Field(
        30.0,
        gt=0,
        validation_alias=_env("SCENEMINT_IMAGE_FIRST_BYTE_TIMEOUT"),
        description="time until an image download's answer begins",
    )
    image_idle_timeout: float = Field(
        30.0,
        gt=0,
        validation_alias=_env("SCENEMINT_IMAGE_IDLE_TIMEOUT"),
        description="longest silence between two chunks of an image",
    )
    stream_idle_timeout: float = Field(
        120.0, gt=0, validation_alias=_env("SCENEMINT_STREAM_IDLE_TIMEOUT")
    )
    stream_ping_interval: float = Field(
        15.0, gt=0, validation_alias=_env("SCENEMINT_STREAM_PING_INTERVAL")
    )
    submit_attempts: int = Field(
        3,
        ge=1,
        le=10,
        validation_alias=_env("SCENEMINT_SUBMIT_ATTEMPTS"),
        description="most attempts of one submission, all within the submit timeout",
    )
    image_deadline: float = Field(
        120.0,
        gt=0,
        validation_alias=_env("SCENEMINT_IMAGE_DEADLINE"),
        description="the longest a whole image download may take, however it drips",
    )
    stream_deadline: float = Field(
        300.0,
        gt=0,
        validation_alias=_env("SCENEMINT_STREAM_DEADLINE"),
        description="the longest a whole enhancement stream may last",
    )
    image_fetch_deadline: float = Field(
        600.0,
        gt=0,
        validation_alias=_env("SCENEMINT_IMAGE_FETCH_DEADLINE"),
        description="a finished image not copied into our store this long after the upstream"
        " finished fails its task (refunded)",
    )
    breaker_failure_rate: float = Field(
        0.5,
        gt=0,
        le=1,
        validation_alias=_env("SCENEMINT_BREAKER_FAILURE_RATE"),
        description="share of failed calls in the window that opens an operation's breaker",
    )
    breaker_min_calls: int = Field(
        20,
        ge=1,
        validation_alias=_env("SCENEMINT_BREAKER_MIN_CALLS"),
        description="fewest calls in the window before a breaker may open",
    )
    breaker_window: float = Field(
        30.0,
        gt=0,
        validation_alias=_env("SCENEMINT_BREAKER_WINDOW"),
        description="seconds of calls a breaker judges the failure rate over",
    )
    breaker_cooldown: float = Field(10.0, ge=0, validation_alias=_env("SCENEMINT_BREAKER_COOLDOWN"))
    upstream_pool_size: int = Field(
        2048,
        ge=1,
        validation_alias=_env("SCENEMINT_UPSTREAM_POOL_SIZE"),
        description="most upstream connections at once; each open enhancement stream holds one",
    )

    # -- the image store ---------------------------------------------------------------
    image_store: str = Field(
        "",
        validation_alias=_env("SCENEMINT_IMAGE_STORE"),
        description="file:///path or s3://bucket/prefix; empty: <data dir>/images",
    )
    image_redirect: Literal["stream", "presigned"] = Field(
        "stream",
        validation_alias=_env("SCENEMINT_IMAGE_REDIRECT"),
        description="presigned: answer image requests with a redirect to a short-lived URL (S3)",
    )
    image_retention_days: float = Field(
        30.0,
        ge=0,
        validation_alias=_env("SCENEMINT_IMAGE_RETENTION_DAYS"),
        description="images are deleted this many days after they were stored; 0 keeps them",
    )
    copy_concurrency: int = Field(
        4,
        ge=1,
        le=256,
        validation_alias=_env("SCENEMINT_COPY_CONCURRENCY"),
        description="image copies a process runs at once",
    )
    sweep_interval: float = Field(
        3600.0,
        gt=0,
        validation_alias=_env("SCENEMINT_SWEEP_INTERVAL"),
        description="seconds between two retention sweeps (one instance at a time, by lease)",
    )

    # -- client connections ----------------------------------------------------------
    header_timeout: float = Field(
        10.0,
        gt=0,
        validation_alias=_env("SCENEMINT_HEADER_TIMEOUT"),
        description="a request's head must arrive within this many seconds",
    )
    body_min_rate: int = Field(
        1024,
        ge=1,
        validation_alias=_env("SCENEMINT_BODY_MIN_RATE"),
        description="bytes per second a request body must keep up, after the header timeout",
    )
    keep_alive_timeout: float = Field(
        5.0,
        gt=0,
        validation_alias=_env("SCENEMINT_KEEP_ALIVE_TIMEOUT"),
        description="an idle keep-alive connection is closed after this many seconds",
    )
    send_timeout: float = Field(
        60.0,
        gt=0,
        validation_alias=_env("SCENEMINT_SEND_TIMEOUT"),
        description="a client that takes nothing we write for this long is cut off",
    )
    send_min_rate: int = Field(
        4096,
        ge=1,
        validation_alias=_env("SCENEMINT_SEND_MIN_RATE"),
        description="bytes per second a client must read while our write buffer is full",
    )
    max_connections: int = Field(
        8192,
        ge=1,
        validation_alias=_env("SCENEMINT_MAX_CONNECTIONS"),
        description="most open client connections per process; past it, 503",
    )

    # -- polling and reconciliation ------------------------------------------------
    poll_batch_size: int = Field(
        50, ge=1, le=500, validation_alias=_env("SCENEMINT_POLL_BATCH_SIZE")
    )
    poll_min_interval: float = Field(
        0.5,
        ge=0,
        validation_alias=_env("SCENEMINT_POLL_MIN_INTERVAL"),
        description="a task is asked upstream at most once per this many seconds",
    )
    reconcile_interval: float = Field(
        30.0, gt=0, validation_alias=_env("SCENEMINT_RECONCILE_INTERVAL")
    )
    reconcile_deadline: float = Field(
        60.0,
        gt=0,
        validation_alias=_env("SCENEMINT_RECONCILE_DEADLINE"),
        description="the longest a reconcile round may take; what is left waits for the next",
    )
    resubmit_concurrency: int = Field(
        4, ge=1, le=256, validation_alias=_env("SCENEMINT_RESUBMIT_CONCURRENCY")
    )
    lease_seconds: float = Field(
        30.0,
        gt=0,
        validation_alias=_env("SCENEMINT_LEASE_SECONDS"),
        description="term of a lease on a task in flight; its holder renews it at a third",
    )
    handoff_grace: float = Field(
        60.0,
        ge=0,
        validation_alias=_env("SCENEMINT_HANDOFF_GRACE"),
        description="a task whose answer never reached its client waits this long (after its"
        " request ended) for the client to come back with its Idempotency-Key before it is"
        " refunded",
    )
    idempotency_ttl: float = Field(
        86400.0,
        gt=0,
        validation_alias=_env("SCENEMINT_IDEMPOTENCY_TTL"),
        description="an Idempotency-Key names its task for at least this many seconds",
    )
    task_max_age: float = Field(1800.0, gt=0, validation_alias=_env("SCENEMINT_TASK_MAX_AGE"))
    resubmit_window: float = Field(
        600.0,
        ge=0,
        validation_alias=_env("SCENEMINT_RESUBMIT_WINDOW"),
        description="a submission whose outcome is unknown is resubmitted while younger than this",
    )

    # -- limits ------------------------------------------------------------------
    max_prompt_chars: int = Field(4000, ge=1, validation_alias=_env("SCENEMINT_MAX_PROMPT_CHARS"))
    max_reference_bytes: int = Field(
        10 * MiB, ge=1, validation_alias=_env("SCENEMINT_MAX_REFERENCE_BYTES")
    )
    max_json_bytes: int = Field(64 * 1024, ge=1, validation_alias=_env("SCENEMINT_MAX_JSON_BYTES"))
    max_image_bytes: int = Field(50 * MiB, ge=1, validation_alias=_env("SCENEMINT_MAX_IMAGE_BYTES"))
    image_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias=_env("SCENEMINT_IMAGE_HOSTS"),
        description="extra origins (scheme://host[:port]) images may be proxied from",
    )

    # -- the API's interactive documentation ---------------------------------------
    docs_assets: Path | None = Field(
        None,
        validation_alias=_env("SCENEMINT_DOCS_ASSETS"),
        description="a directory with swagger-ui-dist's swagger-ui-bundle.js and"
        " swagger-ui.css: /docs loads them from the service instead of a CDN (offline use)",
    )

    # -- logging -----------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", validation_alias=_env("SCENEMINT_LOG_LEVEL")
    )
    log_format: Literal["text", "json"] = Field(
        "text", validation_alias=_env("SCENEMINT_LOG_FORMAT")
    )

    @field_validator("docs_assets")
    @classmethod
    def _has_swagger_ui(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        missing = [name for name in DOCS_ASSET_FILES if not (value / name).is_file()]
        if missing:
            raise ValueError(
                f"needs {' and '.join(missing)} (the dist/ files of the npm package"
                " swagger-ui-dist)"
            )
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_in_any_case(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("upstream_base_url", "upstreams_file", "docs_assets", mode="before")
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("upstream_base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None:
            check_upstream_url(value)
        return value

    @field_validator("upstream_api_key")
    @classmethod
    def _usable_key(cls, value: SecretStr | None) -> SecretStr | None:
        return check_key(value)

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str | None) -> str | None:
        if value is not None and value.strip():
            value = value.strip()
            if not value.startswith(DATABASE_SCHEMES):
                raise ValueError(
                    "must be sqlite:///path/file.sqlite3 or postgresql://user@host:5432/db"
                )
            return value
        return None

    @field_validator("image_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            return [image_origin(part) if isinstance(part, str) else part for part in value]
        return value

    @field_validator("openai_sizes", mode="before")
    @classmethod
    def _parse_sizes(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        sizes = dict(DEFAULT_OPENAI_SIZES)
        for part in value.split(","):
            if not part.strip():
                continue
            ours, _, theirs = part.partition("=")
            try:
                sizes[ours.strip()] = openai_size(ours.strip(), theirs.strip())
            except ValueError as exc:
                raise ValueError(
                    f"SCENEMINT_OPENAI_SIZES: {part.strip()!r} is not like 16:9=1536x1024 ({exc})"
                ) from None
        return sizes

    @field_validator("image_store")
    @classmethod
    def _known_image_store(cls, value: str) -> str:
        value = value.strip()
        if value and not value.startswith(("file:///", "s3://")):
            raise ValueError("SCENEMINT_IMAGE_STORE must be file:///path or s3://bucket/prefix")
        if value.startswith("s3://") and not value[len("s3://") :].split("/")[0]:
            raise ValueError("SCENEMINT_IMAGE_STORE: s3:// needs a bucket (s3://bucket/prefix)")
        return value

    @field_validator("quota_timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        timezone_of(value)  # fail fast on a typo, not on the first check-in
        return value

    # -- derived values ------------------------------------------------------------
    @property
    def upstream_root(self) -> str | None:
        """The task API root: base URL without whitespace, trailing `/` or `/v1`."""
        return upstream_root(self.upstream_base_url)

    @property
    def api_key(self) -> str | None:
        if self.upstream_api_key is None:
            return None
        key = self.upstream_api_key.get_secret_value().strip()
        return key or None

    @property
    def upstream_configured(self) -> bool:
        return self.upstream_root is not None and self.api_key is not None

    @property
    def tz(self) -> dt.tzinfo:
        return timezone_of(self.quota_timezone)

    def resolved_database_url(self) -> str:
        """`SCENEMINT_DATABASE_URL`, or the embedded SQLite file in the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'scenemint.sqlite3').as_posix()}"


class SettingsError(Exception):
    """Settings the service cannot run with: `lines`, one per bad variable, each naming the
    variable, its value and what is allowed."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        super().__init__("\n".join(lines))


DATABASE_SCHEMES = ("sqlite:///", "postgresql://", "postgres://", "postgresql+psycopg://")


def check_upstream_url(value: str) -> None:
    """An upstream's base URL: http(s), a host, a port that exists; ValueError otherwise."""
    root = upstream_root(value)
    problem = "must be an http(s) URL such as http://127.0.0.1:3200"
    if root is None or not root.startswith(("http://", "https://")):
        raise ValueError(problem)
    try:
        parts = urlsplit(root)
        parts.port  # noqa: B018 - raises on a port out of range
    except ValueError:
        raise ValueError(problem) from None
    if not parts.hostname:
        raise ValueError(problem)


def check_key(key: SecretStr | None) -> SecretStr | None:
    """An upstream key that can be sent in an HTTP header; ValueError otherwise. Surrounding
    whitespace is dropped where the key is used; inside it, only printable ASCII."""
    if key is not None and any(not ("!" <= c <= "~") for c in key.get_secret_value().strip()):
        raise ValueError(
            "must be printable ASCII without spaces or line breaks (it is sent in a header)"
        )
    return key


def load_settings(**values: object) -> Settings:
    """The settings from the environment (and `.env`); SettingsError saying what to fix."""
    try:
        return Settings(**values)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise SettingsError([_explain(error) for error in exc.errors()]) from None


def _explain(error: Any) -> str:
    name = str(error["loc"][0]) if error["loc"] else "settings"
    field = _field_named(name)
    hidden = field is not None and (
        field.repr is False or field.annotation in (SecretStr, SecretStr | None)
    )
    value = "(hidden)" if hidden else repr(error.get("input"))[:80]
    if error["type"] == "value_error":
        reason = str(error["ctx"]["error"]).removeprefix(f"{name}: ").removeprefix(f"{name} ")
    else:
        reason = f"must be {_allowed(field)}" if field is not None else error["msg"]
    return f"{name}={value} is not valid: {reason}"


def _field_named(env_name: str) -> FieldInfo | None:
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names = alias.choices if isinstance(alias, AliasChoices) else [alias or name]
        if env_name in names or env_name == name:
            return field
    return None


def _allowed(field: FieldInfo) -> str:
    """What a field takes, for people: "an integer from 1 to 256", "one of text, json"."""
    annotation = field.annotation
    literal = getattr(annotation, "__args__", ()) if get_origin(annotation) is Literal else ()
    if literal:
        return "one of " + ", ".join(str(choice) for choice in literal)
    kind = {int: "an integer", float: "a number", bool: "true or false"}.get(
        annotation,  # type: ignore[arg-type]
        "a value like the README's",
    )
    bounds = {type(m).__name__: m for m in field.metadata}
    low = bounds.get("Ge") or bounds.get("Gt")
    high = bounds.get("Le") or bounds.get("Lt")
    if low is not None and high is not None:
        return f"{kind} from {_bound(low)} to {_bound(high)}"
    if low is not None:
        return f"{kind} {'>' if type(low).__name__ == 'Gt' else '>='} {_bound(low)}"
    if high is not None:
        return f"{kind} {'<' if type(high).__name__ == 'Lt' else '<='} {_bound(high)}"
    return kind


def _bound(constraint: object) -> str:
    for attribute in ("ge", "gt", "le", "lt"):
        if hasattr(constraint, attribute):
            return f"{getattr(constraint, attribute):g}"
    return str(constraint)


def openai_size(ours: str, theirs: str) -> str:
    """How the openai kind sends one of our sizes: `WIDTHxHEIGHT` or `auto`."""
    if ours not in DEFAULT_OPENAI_SIZES:
        raise ValueError(f"our sizes are {', '.join(DEFAULT_OPENAI_SIZES)}, not {ours!r}")
    if not _SIZE.fullmatch(theirs):
        raise ValueError(f"{theirs!r} is not WIDTHxHEIGHT or auto")
    return theirs


def image_origin(value: str) -> str:
    """An origin of SCENEMINT_IMAGE_HOSTS: `scheme://host[:port]`, nothing less or more.

    A host without a scheme was dropped silently before, and a path widened the allowance
    to the whole origin: both are refused at start-up now.
    """
    text = value.strip().rstrip("/")
    parts = urlsplit(text)
    try:
        parts.port  # noqa: B018 - raises on a port out of range
    except ValueError as exc:
        raise ValueError(f"image host {value!r} has an invalid port") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"image host {value!r} is not an origin like https://cdn.example.com")
    if parts.path or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(
            f"image host {value!r} must be an origin (scheme://host[:port]) without a path:"
            " the whole origin is allowed"
        )
    return text


def upstream_root(base_url: str | None) -> str | None:
    if base_url is None:
        return None
    root = base_url.strip().rstrip("/")
    if root.endswith("/v1"):
        root = root[: -len("/v1")].rstrip("/")
    return root or None


def timezone_of(name: str) -> dt.tzinfo:
    # UTC needs no tz database, so the default works even where tzdata is absent.
    if name.strip().upper() in {"UTC", "Z", "ETC/UTC"}:
        return dt.UTC
    try:
        return ZoneInfo(name.strip())
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown timezone {name!r}") from exc
