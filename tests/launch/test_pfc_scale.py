"""`bench/pfc_scale.py device` (the GPU check of the Partial FC head) runs end to end as a command on whatever
device there is.
"""

import math


def test_device_check_script_runs(tmp_path):
    """`bench/pfc_scale.py device` (the GPU check of the head) runs end to end on whatever device there is:
    both offload modes, finite losses, one row per configuration in its JSON."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "device.json"
    subprocess.run([sys.executable, str(root / "bench" / "pfc_scale.py"), "device", "--classes", "3000,30000",
                    "--batch", "16", "--emb", "16", "--steps", "2", "--warmup", "1", "--json", str(out)],
                   check=True, cwd=root, timeout=300, capture_output=True)
    runs = json.loads(out.read_text())["runs"]
    assert [(r["classes"], r["offload"]) for r in runs] == [(3000, "none"), (3000, "cpu"), (30000, "none"),
                                                            (30000, "cpu")]
    for r in runs:
        assert r["num_sample"] == r["classes"] // 10 and math.isfinite(r["loss"]) and r["median_ms"] > 0
