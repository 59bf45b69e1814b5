"""The cluster's settings (memflow/settings.py explains the scheme): what a replica is built
from, and what every job on a Ray cluster shares."""
from __future__ import annotations

from typing import ClassVar, Optional

from pydantic import Field

from memflow.settings import EncodeSettings, EngineSettings, QualitySettings, Settings


class StorageSettings(Settings):
    title: ClassVar[str] = "storage"

    endpoint_url: Optional[str] = Field(None, description="S3-compatible endpoint (else env MEMFLOW_S3_ENDPOINT / "
                                                          "AWS_ENDPOINT_URL)", json_schema_extra={"metavar": "URL"})


class ReplicaSettings(EngineSettings, QualitySettings, EncodeSettings, StorageSettings):
    """What each generator replica is built from: plain values, no credential (replicas use
    their node's own: cluster/replica.py). The driver resolves `device` to cuda or cpu."""

    title: ClassVar[str] = "output"

    output: str = Field("./outputs", description="output prefix URL (file path, s3://bucket/prefix, ...)",
                        json_schema_extra={"metavar": "URL"})
    save_latents: bool = Field(False, description="also write latents/<id>.safetensors (regression runs compare "
                                                  "them; a continuation replays them instead of generating again)")
    pipelined: bool = Field(True, description="overlap one script's decoding, encoding and upload with the next "
                                              "one's generation on each replica")
    checkpoint_seconds: float = Field(120.0, ge=0, description=(
        "save the latents of a story in flight under <output>/state/ every this many seconds of generation, so a "
        "retry after a lost replica or node replays them and generates only the rest (0: off)"),
        json_schema_extra={"metavar": "SECONDS"})


class ClusterSettings(Settings):
    """Where a job runs and how wide."""

    title: ClassVar[str] = "cluster"

    address: Optional[str] = Field(None, description="Ray address (default: RAY_ADDRESS, else a local Ray on "
                                                     "127.0.0.1)")
    replicas: Optional[int] = Field(None, ge=1, description="exactly N generator replicas (same as --min-replicas "
                                                            "N --max-replicas N)")
    memory_shards: int = Field(1, ge=0, description="memory bank service shards (0: in-process ranking)")
