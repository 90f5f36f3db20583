"""tests/support/forkserver.py, which the configuration matrix runs its combinations with: a forked run reports the
entry point's own exit status and output, both ranks of a 2-rank job run as one job, and a run past its timeout is
killed and reported as such (None), not waited for."""
import json
import os

from tests.support.forkserver import ROOT, ForkServer

CONFIG = {"train_micro_batch_size_per_gpu": 2,
          "engine": {"model": {"name": "mbf", "embedding_size": 16},
                     "head": {"num_classes": 7, "scale": 16.0},
                     "data": {"source": "synthetic"},
                     "train": {"max_steps": 2, "log_every": 1, "watchdog_factor": 0},
                     "checkpoint": {"export": False}}}


def test_exit_status_output_ranks_and_timeout(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**CONFIG, "engine": {**CONFIG["engine"], "head": {"num_clases": 7}}}))
    good = tmp_path / "good.json"
    good.write_text(json.dumps({**CONFIG, "engine": {**CONFIG["engine"],
                                                     "train": {**CONFIG["engine"]["train"],
                                                               "output_dir": str(tmp_path / "out")}}}))
    slow = tmp_path / "slow.json"
    slow.write_text(json.dumps({**CONFIG, "engine": {**CONFIG["engine"],
                                                     "train": {**CONFIG["engine"]["train"], "max_steps": 100000,
                                                               "output_dir": str(tmp_path / "slow_out")}}}))
    from engine.runtime.dist import find_free_port

    with ForkServer() as server:
        rc, _ = server.run("run", ["--config", str(bad)], world=1, env=env, cwd=ROOT, log=tmp_path / "bad.log",
                           timeout=120)
        assert rc == 2
        assert "config error: " in (tmp_path / "bad.log").read_text() and "num_clases" in (
            tmp_path / "bad.log").read_text()

        rc, cpu = server.run("run", ["--config", str(good)], world=2, env=env, cwd=ROOT,
                             log=tmp_path / "good.log", timeout=300, port=find_free_port())
        assert rc == 0, (tmp_path / "good.log").read_text()[-3000:]
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["steps"] == 2 and cpu > 0

        rc, _ = server.run("run", ["--config", str(slow)], world=1, env=env, cwd=ROOT, log=tmp_path / "slow.log",
                           timeout=3)
        assert rc is None  # killed at its timeout
