"""Multi-node launches, emulated on one machine (issue 11): two `deepspeed --hostfile HF --no_ssh --node_rank
{0,1} --master_addr 127.0.0.1` launchers, one rank each, as two nodes would run them.

- 2 nodes x 1 rank equals 1 node x 2 ranks (tests/launching.reference) step for step: every loss and the final
  weights bit for bit; global rank 0 writes every shared file and rank 1 only its own checkpoint shards.
- A node whose output_dir is not the shared directory is refused at start-up, naming it, on both nodes.
- A node killed mid-run (its launcher, launch.py and rank: SIGKILL to the process group) ends the other
  node's job promptly with a message, instead of leaving it waiting.
"""
import os
import signal
import subprocess

from engine.runtime.dist import find_free_port
from tests import launching as L


def _hostfile(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("node-a slots=1\nnode-b slots=1\n")  # `<host> slots=<processes on that host>`, one per line
    return path


def _two_nodes(tmp_path, config, overrides=((), ()), faults=None, names=("node0", "node1")):
    hostfile, port = _hostfile(tmp_path), find_free_port()
    procs = []
    for node in (0, 1):
        cmd = L.deepspeed_cmd(config, *overrides[node], port=port, faults=faults is not None, hostfile=hostfile,
                              node_rank=node)
        procs.append(L.start(cmd, tmp_path / f"{names[node]}.log", faults, start_new_session=True))
    return procs


def _kill_node(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def test_two_nodes_equal_one_node_and_only_rank0_writes_shared_files(tmp_path, tmp_path_factory):
    reference = L.reference(tmp_path_factory)
    out = tmp_path / "out"
    config = L.tiny_config(tmp_path / "tiny.json", out)
    audit = tmp_path / "audit"
    audit.mkdir()
    procs = _two_nodes(tmp_path, config, faults={"audit_writes": str(audit)})
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            _kill_node(p)
    logs = [(tmp_path / f"node{n}.log").read_text() for n in (0, 1)]
    assert codes == [0, 0], [log[-2000:] for log in logs]
    assert "nnodes=2, num_local_procs=1, node_rank=1" in logs[1]
    assert L.losses(out) == L.losses(reference)
    L.assert_same_model(L.model(out), L.model(reference))

    def written(rank):
        lines = (audit / f"writes_rank{rank}.txt").read_text().splitlines()
        return {os.path.relpath(p, out) for p in lines if p.startswith(str(out) + os.sep)}

    shared = {"config.json.tmp", "metrics.jsonl", "summary.json.tmp", "model.pt.part", ".arcscale.lock",
              ".arcscale.nodecheck.part", "checkpoints/latest.part", "checkpoints/step_00000006.tmp/meta.json.part",
              "checkpoints/step_00000006.tmp/backbone.pt.part", "checkpoints/step_00000006.tmp/head_rank00000.pt.part"}
    assert shared <= written(0), written(0)
    rank1 = written(1)
    assert rank1 and all(os.path.basename(p) in ("head_rank00001.pt.part", "rng_rank00001.pt.part") for p in rank1), \
        rank1


def test_a_node_without_the_shared_output_dir_is_refused(tmp_path):
    config = L.tiny_config(tmp_path / "tiny.json", tmp_path / "shared")
    local = tmp_path / "node1_local_disk"
    procs = _two_nodes(tmp_path, config, overrides=((), (f"engine.train.output_dir={local}",)))
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            _kill_node(p)
    for node in (0, 1):
        log = (tmp_path / f"node{node}.log").read_text()
        assert codes[node] != 0, log[-2000:]
        assert f"engine.train.output_dir {local} on host" in log and "(rank 1) is not the directory rank 0 uses" \
            in log, log[-2000:]
    assert not (tmp_path / "shared" / "checkpoints").exists()


def test_a_killed_node_ends_the_other_nodes_job(tmp_path):
    config = L.tiny_config(tmp_path / "tiny.json", tmp_path / "out", dist_timeout_s=30)
    pause = tmp_path / "pause"
    procs = _two_nodes(tmp_path, config, faults={"pause_after_step": 2, "pause_file": str(pause)})
    try:
        L.wait_for([tmp_path / "pause.ready0", tmp_path / "pause.ready1"], procs)
        _kill_node(procs[1])  # node 1 is gone: launcher, launch.py and its rank
        pause.write_text("go")
        code = procs[0].wait(timeout=240)  # gloo sees the closed connection at once; the timeout bounds it
    finally:
        for p in procs:
            _kill_node(p)
    log = (tmp_path / "node0.log").read_text()
    assert code != 0, log[-2000:]
    assert "[rank 0] stopping: a collective failed because another rank stopped" in log \
        or "Timed out" in log, log[-3000:]
