"""The jobs' settings (memflow/settings.py explains the scheme): the batch job's and the
regression job's, built from the engine's and the cluster's."""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Optional

from pydantic import Field, model_validator

from cluster.settings import ClusterSettings, ReplicaSettings, StorageSettings
from memflow.settings import EngineSettings, LimitSettings, QualitySettings

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


class BatchSettings(ReplicaSettings, ClusterSettings, LimitSettings):
    """`jobs/batch.py`: a manifest of scripts in, a captioned video dataset out."""

    title: ClassVar[str] = "batch job"

    scripts: str = Field(str(EXAMPLES / "sample_scripts.jsonl"), description="manifest URL: .jsonl, .txt, .parquet "
                         "(any fsspec URL)", json_schema_extra={"metavar": "URL"})
    min_replicas: Optional[int] = Field(None, ge=1, description=(
        "replicas kept until the end for retries (default 1); idle ones beyond it are released when the work runs "
        "out, so the autoscaler can take their nodes back"))
    max_replicas: Optional[int] = Field(None, ge=1, description=(
        "replicas requested at most (default: GPUs the cluster has or its autoscaler can add; 1 on CPU); at most "
        "one per script of the manifest"))
    replica_resources: Optional[dict[str, float]] = Field(None, description=(
        'custom Ray resources each replica needs besides its GPU/CPU, e.g. \'{"L40S": 1}\' to keep replicas on one '
        "node group"))
    start_timeout: float = Field(1800.0, gt=0, description=(
        "seconds work may wait with no replica up (nodes joining, weights loading) before the job gives up"),
        json_schema_extra={"metavar": "SECONDS"})
    stall_timeout: Optional[float] = Field(None, gt=0, description=(
        "restart a replica whose render makes no progress for this long (default: the larger of 600 s and 20x the "
        "slowest chunk seen)"), json_schema_extra={"metavar": "SECONDS"})
    in_flight: int = Field(2, ge=1, description="scripts queued per replica")
    max_attempts: int = Field(3, ge=1, description=(
        "render attempts per script lost to its own failures (its exception, a stall); failures of the cluster "
        "under it (a node or memory shard lost, storage down) never count"))
    max_replica_deaths: int = Field(5, ge=1, description=(
        "times a replica process may die on a live node while rendering one script (it may be the script's doing) "
        "before the script is given up"))
    infra_timeout: float = Field(3600.0, gt=0, description=(
        "seconds a script may wait for the cluster to recover (backing off between retries) before the job ends "
        "with the reason"), json_schema_extra={"metavar": "SECONDS"})

    @model_validator(mode="after")
    def _replica_counts(self):
        if self.replicas is not None and (self.min_replicas is not None or self.max_replicas is not None):
            raise ValueError("give either replicas or min_replicas/max_replicas, not both")
        if self.min_replicas and self.max_replicas and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is larger than max_replicas ({self.max_replicas})")
        for name, amount in (self.replica_resources or {}).items():
            if not amount > 0:
                raise ValueError(f"replica_resources: {name!r} needs a positive amount, got {amount}")
        return self


class RegressionSettings(EngineSettings, QualitySettings, ClusterSettings, StorageSettings):
    """`jobs/regression.py`: render a suite, compare it with the baseline, report. The memory
    mode and policy default to the suite's (a layer between the defaults and --config)."""

    title: ClassVar[str] = "regression job"

    suite: str = Field(str(EXAMPLES / "regression_suite.json"), description=(
        "suite JSON: {name, scripts: [...], thresholds: {...}, memory, fidelity}"), json_schema_extra={"metavar": "URL"})
    baseline: str = Field("./outputs/regression/baseline", description="baseline render (a batch output)",
                          json_schema_extra={"metavar": "URL"})
    output: str = Field("./outputs/regression/latest", description="where this run's render and report go",
                        json_schema_extra={"metavar": "URL"})
    expect_change: bool = Field(False, description=(
        "the model or policy changed on purpose: skip the pixel comparisons (PSNR, SSIM, latents, traces, frame "
        "count) and judge quality and speed only"))
    promote: bool = Field(False, description="make this run the new baseline")
