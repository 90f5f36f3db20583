"""engine.profile's arithmetic without a run: MFU and HFU of r50 from a given step time and peak, against the
planner's MACs computed by hand, and profile settings that name the bad key. (The profile of a real 2-rank run:
tests/distributed/test_profile.py; a sweep through the launcher: tests/launch/test_profile.py.)
"""

import math
from pathlib import Path

import pytest

from tests.support.profiling import tiny_profile_config

ROOT = Path(__file__).resolve().parents[2]


def test_mfu_by_hand_for_r50():
    """MFU and HFU of r50 from a given step time and peak, against the planner's MACs computed here."""
    from engine.config import schema as config
    from engine.perf import planner as plan
    from engine.perf import report as profile_report

    # synthetic data shaped like MS1MV3: the recipe's 93,431 classes (a profiled run has its data's count)
    cfg = config.load(ROOT / "ds_configs" / "r50.json", ["engine.model.checkpoint=\"all\"", "engine.data.source=synthetic"])
    p = plan.plan(cfg, 1, device="gpu")
    step_s, peak = 0.25, 989.0
    rank = dict(rank=0, steps=[dict(step=1, step_s=step_s, train_s=step_s,
                                    phases={"forward": 0.1, "head": 0.02, "backward": 0.1, "backbone_step": 0.02,
                                            "data": 0.005, "h2d": 0.001, "head_step": 0.002})],
                comm=[], comm_s_per_step=0.0, peak_bytes=2 ** 30, peak_kind="cuda_max_allocated",
                memory={"backbone parameters": 4 * p.backbone.num_params}, peak_tflops=peak, peak_source="given",
                timer="cuda_events", threads=1, end_of_run={}, device="cuda:0", device_name="test")
    report = profile_report.build_report(cfg, [rank], argv=["test"], trace_files=[])
    macs = p.backbone.macs
    head = 6 * 93431 * 512  # rate 1.0: every class row, forward + 2x backward, per sample
    sps = 128 / step_s
    assert macs > 6e9 and p.backbone.recompute_macs == pytest.approx(macs, rel=0.05)  # r50: ~6.3 GMACs
    model = 2 * p.backbone.train_macs + head  # forward + backward (~3x forward) + head
    assert report["utilisation"]["mfu"] == pytest.approx(model * sps / (peak * 1e12), rel=1e-9)
    hardware = model + 2 * p.backbone.recompute_macs  # the checkpointed blocks' forward runs twice
    assert report["utilisation"]["hfu"] == pytest.approx(hardware * sps / (peak * 1e12), rel=1e-9)
    assert report["bottleneck"]["kind"] == "compute" and "MFU" in report["bottleneck"]["text"]
    profile_report.validate(report)
    assert math.isclose(report["throughput"]["samples_per_s"], sps)


@pytest.mark.parametrize("profile, message", [
    ({"num_steps": 0}, "engine.profile.num_steps: expected >= 1, got 0"),
    ({"start_step": -1}, "engine.profile.start_step: expected >= 0, got -1"),
    ({"peak_tflops": -1.0}, "engine.profile.peak_tflops: expected >= 0"),
    ({"enabled": True, "start_step": 2, "num_steps": 2}, r"ends after engine.train.max_steps \(3\)"),
    ({"enable": True}, "unknown key 'engine.profile.enable'"),
])
def test_profile_config_errors(profile, message):
    from engine.config import schema as config

    with pytest.raises(config.ConfigError, match=message):
        config.from_dict(tiny_profile_config("/tmp/unused", **profile))
