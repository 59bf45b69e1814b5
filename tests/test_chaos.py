"""A chaos run (benchmarks/chaos.py) as a test: a multi-node cluster on 127.0.0.1 whose
replicas, memory shards, nodes (also at a steady rate) and driver are killed and whose
S3 server goes away while a manifest with hostile lines, hanging scripts, trees and
continuations is rendered with one attempt per script. benchmarks/chaos.py checks the
outcome (no good script failed, every video committed exactly once and identical to its
flat render, no dataset snapshot with a row twice, every bad line reported, exit status
and summary in line) and raises AssertionError otherwise."""
import pytest

from benchmarks import chaos


@pytest.mark.slow
def test_chaos_run_commits_every_good_script_exactly_once(tmp_path):
    report = chaos.run(n_good=40, n_bad=20, n_nodes=2, chaos_s=150, seed=7, gap_s=(6, 12), workdir=tmp_path,
                       n_trees=3, node_every_s=45, timeout_s=1500)
    assert sum(report["kills"].values()) >= 5, report["kills"]  # the chaos happened
    assert report["identical_to_flat"] == report["stories"] > 0
    assert report["summary"]["exit_status"] == 1
