"""The one place settings are read (environment variables prefixed `APOPTOSIS_`)."""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="APOPTOSIS_", extra="ignore")

    # Embedded default: everything under ./var, no servers.
    home: Path = Path("var")
    database_url: str = ""  # default: sqlite:///<home>/apoptosis.db
    broker_url: str = ""  # default: filesystem:// under <home>/broker
    store_url: str = ""  # default: <home>/store (local files); or s3://bucket?endpoint_url=…
    max_upload_bytes: int = Field(default=2 * 1024**3, gt=0)
    # Uploads of pickled modules (torch_pickle, .bin weights) run code when loaded: refused
    # unless the operator turns this on, and even then loaded only in the worker.
    trusted_mode: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # float32 matmuls and convolutions in TF32 on CUDA (Ampere and later): ~8× the throughput,
    # 10 mantissa bits; scores are summed in float32 either way
    allow_tf32: bool = True
    # torch threads per worker (0: the cores the worker may use ÷ workers_per_host)
    worker_threads: int = Field(default=0, ge=0)
    workers_per_host: int = Field(default=1, ge=1)
    # Bytes a job may use on its device (0: what the device has free); a model that cannot be
    # scored within it fails at once with out_of_memory
    worker_memory_bytes: int = Field(default=0, ge=0)
    job_queue: Literal["cpu", "gpu"] = "cpu"  # where the API sends jobs; GPU fleets use "gpu"
    job_max_attempts: int = Field(default=3, ge=1)
    # Per tenant: jobs queued, running or cancelling at once; more are refused with a 429
    max_active_jobs: int = Field(default=20, ge=1)
    # Per tenant: bytes of models, datasets and artifacts stored, and uploads per minute
    max_tenant_bytes: int = Field(default=100 * 1024**3, gt=0)
    max_uploads_per_minute: int = Field(default=60, ge=1)
    # Retention: blobs nothing names are deleted this long after they were last stored (the
    # worker sweeps every `sweep_seconds`); artifacts expire `artifact_days` after their job
    # ended (0: never).
    blob_grace_seconds: float = Field(default=600.0, ge=0)
    sweep_seconds: float = Field(default=300.0, gt=0)
    artifact_days: float = Field(default=0.0, ge=0)
    # Hosts (names, addresses or networks such as 10.0.0.0/8) job notifications may reach
    # although they are not public (the SSRF guard refuses them otherwise); JSON list
    webhook_allow: list[str] = Field(default_factory=list)
    webhook_max_attempts: int = Field(default=8, ge=1)
    # A delivery's whole request (connect, send, read) ends at this deadline
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    # Deliveries in flight at once per worker, and per tenant among them: a slow receiver holds
    # its own tenant's slots, never everyone's
    webhook_concurrency: int = Field(default=16, ge=1)
    webhook_per_tenant: int = Field(default=2, ge=1)
    # A call to a job's MLflow tracking server ends at this deadline (an artifact upload gets
    # one more second per MiB it carries)
    tracking_timeout_seconds: float = Field(default=30.0, gt=0)
    heartbeat_seconds: float = Field(default=10.0, gt=0)
    stale_after_seconds: float = Field(default=60.0, gt=0)
    job_soft_time_limit: int = 6 * 3600
    job_hard_time_limit: int = 6 * 3600 + 300
    api_key: str = ""  # `apoptosis up` uses it for its tenant when set (automation)

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'apoptosis.db').resolve()}"

    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    def resolved_store_url(self) -> str:
        return self.store_url or str((self.home / "store").resolve())

    @property
    def broker_folder(self) -> Path:
        return (self.home / "broker").resolve()


@lru_cache
def get_settings() -> Settings:
    return Settings()
