"""The daemon's settings: defaults < TOML file < environment (MTPD_*) < command line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from policies.registry import check as check_policy

MiB = 1 << 20


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class ModelEntry(BaseModel):
    """One `[models.NAME]` table: a model the daemon loads when a request names it."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="GGUF file, mlx-lm folder or repo id on disk")
    drafter: str | None = Field(None, description="drafter folder or 'none' (default: the model's own)")
    drafter_bits: Literal[8, 4, 3] | None = None
    speculation: str | None = Field(None, description="this model's default draft policy (default: `speculation`)")
    pinned: bool = Field(False, description="never unloaded to make room for another model")
    keep_alive_s: float | None = Field(None, ge=-1, description="seconds unused before it is unloaded (default: "
                                                                 "`keep_alive_s`; 0: after each answer; -1: never)")

    @field_validator("speculation")
    @classmethod
    def _known_policy(cls, value: str | None) -> str | None:
        if value is not None:
            check_policy(value)
        return value


def default_config_file() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "mtpd" / "config.toml"


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "mtpd"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MTPD_", extra="forbid", validate_default=True)

    host: str = Field("127.0.0.1", description="address to bind (loopback by default)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")
    model: str | None = Field(None, description="GGUF file, mlx-lm folder or repo id on disk (default: SmolLM2-135M-Instruct)")
    drafter: str | None = Field(None, description="drafter folder (MTP, or a DFlash / DSpark block drafter as released), "
                                "or 'none' (default: the model's own or the shipped one)")
    drafter_bits: Literal[8, 4, 3] | None = Field(None, description="quantize the drafter to this many bits")
    models: dict[str, ModelEntry] = Field(
        {}, description="more models, loaded when a request names them ([models.NAME] tables: path, drafter, "
                        "speculation, pinned, keep_alive_s)")
    models_dir: Path | None = Field(None, description="a folder of mlx-lm model folders and GGUF files, each served "
                                                      "under its folder or file name (besides the Hugging Face cache)")
    keep_alive_s: float = Field(300.0, ge=-1, description="a model other than `model` unused this long is unloaded "
                                                          "(0: after each answer; -1: never)")
    max_memory: int | None = Field(None, ge=0, description="bytes the loaded models' weights may take together; "
                                                           "the least recently used is unloaded first (default: "
                                                           "3/4 of physical memory)")
    speculation: str = Field("adaptive", description="default draft policy: adaptive | adaptive:mtp | off | fixed:K")
    tie_margin: float | None = Field(None, gt=0, description="near-tie guard margin in logits (default: by precision)")
    api_key: SecretStr | None = Field(None, description="if set, requests need 'Authorization: Bearer <key>'")
    allowed_origins: list[str] = Field(
        ["http://localhost:*", "http://127.0.0.1:*", "http://[::1]:*"],
        description="browser origins that may call the API (port '*': any port; '*': every origin); "
                    "a request with another Origin header gets 403")
    model_aliases: list[str] = Field(
        ["claude-*", "gpt-*", "o1*", "o3*", "o4*", "codex-*"],
        description="model names (shell patterns, any case) the loaded model answers: the ones coding agents send "
                    "by default (Claude Code, Codex); reported as unused, any other name gets 404")
    max_queue: int = Field(16, ge=1, description="requests waiting for the engine before 503")
    max_running: int = Field(8, ge=1, description="requests decoding together in one batch (1: one at a time)")
    max_batch_rows: int = Field(64, ge=1, description="rows of one batched forward; drafts are cut first to fit")
    batch_prefill_chunk: int = Field(64, ge=1, description="prompt rows a new request prefills per step beside others")
    request_timeout_s: float = Field(300.0, gt=0, description="a request's longest time in queue + generation")
    idle_timeout_s: float = Field(75.0, gt=0, description="a connection with no request in flight is closed after this")
    max_body_bytes: int = Field(4 * MiB, ge=1024, description="largest request body (413 above)")
    default_max_tokens: int = Field(512, ge=1, description="max_tokens when a request (or generate / bench) gives none")
    default_temperature: float = Field(
        1.0, ge=0, le=2, description="temperature when a request gives none (the APIs' own default is 1; 0: greedy, "
                                     "which suits a small model behind an agent that never sets one)")
    max_tokens_limit: int | None = Field(
        None, ge=1, description="the most tokens one answer may have: a larger max_tokens is lowered to it (the answer "
                                "may end with 'length'); unset: the context left. Agents ask for 32,000 a turn")
    context_overflow: Literal["clamp", "reject"] = Field(
        "clamp", description="max_tokens past the context left: clamp it (the answer may end with 'length') "
                             "or reject the request (400 context_length_exceeded)")
    mlx_cache_bytes: int | None = Field(None, ge=0, description="MLX's buffer cache limit (default: 1 GiB on a GPU, where "
                                                               "MLX's own is its whole memory limit; MLX's 32 MiB on the CPU)")
    prompt_cache_bytes: int = Field(512 * MiB, ge=0, description="memory for the prompt cache (0: off)")
    prompt_cache_disk_bytes: int = Field(1024 * MiB, ge=0, description="disk for cached system prompts (0: off)")
    prompt_cache_min_tokens: int = Field(32, ge=1, description="shortest system prompt kept on disk")
    strip_billing_header: bool = Field(True, description="drop the x-anthropic-billing-header line Claude Code starts "
                                                         "its system prompt with (it changes every request)")
    cache_dir: Path = Field(default_factory=default_cache_dir, description="calibration and prompt cache files")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    log_prompts: bool = Field(False, description="log prompt and answer text (off: only counts)")
    hosts: str | None = Field(None, description="run one rank per host, comma-separated, this one first (MLX distributed)")
    hostfile: Path | None = Field(None, description="the hosts as an mlx.launch hostfile (JSON) instead of --hosts")
    split: Literal["pipeline", "tensor"] = Field("pipeline", description="how the model is shared out over the hosts")
    cluster_port: int = Field(32323, ge=1, le=65535, description="first TCP port of the ring backend on other hosts")
    shutdown_timeout_s: float = Field(30.0, ge=0, description="SIGTERM: time in-flight requests get to finish")

    @field_validator("speculation")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        check_policy(value)
        return value

    def memory_budget(self) -> int:
        return self.max_memory if self.max_memory is not None else physical_memory() * 3 // 4

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)


def _reading(toml_file: Path) -> type[Settings]:
    class FromFile(Settings):
        model_config = SettingsConfigDict(toml_file=toml_file)

    return FromFile


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "settings"
    return f"invalid setting {where}: {err['msg']}"


def load_settings(config_file: Path | None = None, overrides: dict | None = None) -> tuple[Settings, dict[str, str]]:
    """The effective settings and, per field, where its value came from
    ("default", the TOML file's path, "env MTPD_X" or "command line"). `overrides`: command-line
    values (None values are ignored). Raises ValueError with one line on any invalid setting."""
    if config_file is not None and not config_file.is_file():
        raise ValueError(f"no such config file: {config_file}")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    toml_path = config_file or default_config_file()
    cls = _reading(toml_path)
    try:
        settings = cls(**overrides)
        from_toml = TomlConfigSettingsSource(cls)()
        from_env = EnvSettingsSource(cls, env_prefix="MTPD_")()
    except ValidationError as e:
        raise ValueError(_first_error(e)) from None
    except SettingsError as e:  # an MTPD_* variable that does not parse (a list is JSON)
        raise ValueError(f"invalid setting: {e}") from None
    except (OSError, ValueError) as e:  # an unreadable or malformed TOML file
        raise ValueError(f"cannot read {toml_path}: {e}") from None
    origin = {}
    for name in Settings.model_fields:
        if name in overrides:
            origin[name] = "command line"
        elif name in from_env:
            origin[name] = f"env MTPD_{name.upper()}"
        elif name in from_toml:
            origin[name] = str(toml_path)
        else:
            origin[name] = "default"
    return settings, origin


def describe(settings: Settings, origin: dict[str, str]) -> str:
    """`mtpd config show`: one line per setting, value and origin."""
    rows = []
    for name, field in Settings.model_fields.items():
        value = getattr(settings, name)
        shown = "********" if isinstance(value, SecretStr) else ("" if value is None else str(value))
        rows.append((name, shown, origin[name], field.description or ""))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{n:<{width[0]}}  {v:<{width[1]}}  {o:<{width[2]}}  # {d}" for n, v, o, d in rows)
