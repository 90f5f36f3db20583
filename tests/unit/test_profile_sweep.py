"""engine.profile --world-sizes: the sweep's summary (engine.perf.report.build_sweep). Efficiency is samples/s
against linear scaling of the smallest world; above 100% it can only be noise between runs (a shared host),
and on a host already loaded before the first run every figure is, which the summary says instead of printing
"efficiency 129%" as a finding.
"""
from engine.perf import report


def _report(world: int, samples_per_s: float) -> dict:
    step_s = world * 8 / samples_per_s
    return {"run": {"world_size": world},
            "throughput": {"samples_per_s": samples_per_s, "step_time_s": step_s},
            "step": {"cpu_median": step_s * 0.9},
            "phases": {"summary": {"forward": {"median": step_s / 2}, "backward": {"median": step_s / 2}}},
            "communication": {"bytes_per_step": 1024},
            "bottleneck": {"text": "compute-bound"}}


def _lines(reports, **kw) -> list:
    sweep = report.build_sweep(reports, ["a", "b"], ["engine.profile"], **kw)
    return sweep["summary_text"].splitlines()


def test_efficiency_above_100_percent_is_called_noise():
    lines = _lines([_report(1, 10.0), _report(2, 25.8)])  # "world 2 ... efficiency 129%", as seen on a shared host
    world2 = next(line for line in lines if line.startswith("world 2:"))
    assert "efficiency 129% (above 100%: noise, not scaling)" in world2, lines
    assert "noise" not in next(line for line in lines if line.startswith("world 1:"))
    assert not any(line.startswith("host loaded") for line in lines)

    lines = _lines([_report(1, 10.0), _report(2, 18.0)])  # a plausible 90%: a finding, not flagged
    assert "efficiency 90%," in lines[2] and "noise" not in "\n".join(lines), lines


def test_a_loaded_host_flags_every_figure():
    lines = _lines([_report(1, 10.0), _report(2, 18.0)], host_load=(6.6, 2))
    assert lines[-1].startswith("host loaded: load average 6.6 on 2 CPUs before the first run"), lines
    assert "efficiencies above are noise" in lines[-1]
    quiet = _lines([_report(1, 10.0), _report(2, 18.0)], host_load=(0.3, 2))
    assert not any("host loaded" in line for line in quiet), quiet
