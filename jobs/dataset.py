"""The dataset tables of a batch output (cluster/dataset.py), by hand.

    python jobs/dataset.py rebuild --output s3://bucket/runs/x/     # both tables anew from the records
    python jobs/dataset.py migrate --output ./outputs                # Parquet parts of before -> Delta tables
    python jobs/dataset.py history --output ./outputs                # the versions, what each run added

Records are the source of truth: `rebuild` reads every one of them and writes a new
version of each table that replaces its rows (earlier versions stay readable).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import ClassVar, Literal

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pydantic import Field  # noqa: E402

from cluster.dataset import DatasetIndex  # noqa: E402
from cluster.settings import StorageSettings  # noqa: E402
from cluster.storage import Storage  # noqa: E402
from memflow.settings import SettingsError  # noqa: E402


class DatasetSettings(StorageSettings):
    """`jobs/dataset.py`: maintain an output's dataset tables."""

    title: ClassVar[str] = "dataset"

    command: Literal["rebuild", "migrate", "history"] = Field(..., description=(
        "rebuild: both tables anew from the records; migrate: an output indexed with Parquet parts to Delta tables; "
        "history: the tables' versions"), json_schema_extra={"positional": True})
    output: str = Field("./outputs", description="the batch output", json_schema_extra={"metavar": "URL"})


def main(argv=None) -> int:
    try:
        args = DatasetSettings.from_command_line(argv, description=__doc__,
                                                 formatter_class=argparse.RawDescriptionHelpFormatter).settings
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    index = DatasetIndex(Storage(args.output, args.endpoint_url), args.endpoint_url)
    if args.command == "rebuild":
        print(f"rebuilt manifest/ and metrics/ of {args.output} from {index.rebuild()} records")
    elif args.command == "migrate":
        print("migrated to Delta tables" if index.migrate() else "nothing to migrate (no Parquet parts, or tables "
              "exist already)")
    else:
        for name in DatasetIndex.TABLES:
            table = index.table(name)
            for entry in (table.history() if table is not None else []):
                print(json.dumps({"table": name, "version": entry.get("version"), "timestamp": entry.get("timestamp"),
                                  "operation": entry.get("operation"),
                                  "rows_added": (entry.get("operationMetrics") or {}).get(
                                      "num_target_rows_inserted", (entry.get("operationMetrics") or {}).get(
                                          "num_added_rows"))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
