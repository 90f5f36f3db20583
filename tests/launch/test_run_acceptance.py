"""Nothing of a run is written into its output_dir before the run is accepted (config checked, directory locked,
resumed checkpoint's identity checked). The case a newcomer met: the quick start's mbf run, then the quick start
with another backbone and `engine.checkpoint.resume=auto` into the same directory. The second run is refused,
naming the difference, and the first run's record (config.json, train.log, metrics.jsonl, summary.json,
model.pt, checkpoints) is byte for byte what it was: its config.json must not claim r18 beside mbf's weights.
"""
import hashlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QUICK = ["engine.train.max_steps=1", "engine.checkpoint.every=1", "engine.eval.bins=[]"]  # the quick start, cut


def _run(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    sets = [a for o in (*QUICK, f"engine.train.output_dir={out}", *overrides) for a in ("--set", o)]
    return subprocess.run([sys.executable, "run.py", "--config", "ds_configs/quickstart.json", *sets], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def _record(out: Path) -> dict:
    """Every file of the run but the lock and node check (run infrastructure, rewritten by every start): digest."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and not p.name.startswith(".arcscale.")}


def test_a_refused_resume_leaves_the_run_as_it_was(tmp_path):
    out = tmp_path / "quickstart"
    first = _run(out)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    before = _record(out)
    assert {"config.json", "train.log", "metrics.jsonl", "summary.json", "model.pt",
            "checkpoints/latest"} <= set(before), sorted(before)

    second = _run(out, "engine.model.name=r18", "engine.checkpoint.resume=auto")
    assert second.returncode != 0, second.stdout[-2000:]
    assert "belongs to another run" in second.stderr and "engine.model.name: 'mbf' there, 'r18' here" in \
        second.stderr, second.stderr[-2000:]
    assert _record(out) == before
    assert '"name": "mbf"' in (out / "config.json").read_text()
