"""Memory and FLOPs planner, and the search for the fastest settings that fit (engine.perf.plan_cli).

    python -m engine.plan --config ds_configs/r2060.json --world-size 64 --gpu-mem-gb 80
    python -m engine.plan --config ds_configs/r2060.json --world-size 8 --gpu-mem-gb 80 --fit [--write C2.json]
"""
import sys

from engine.perf.plan_cli import main  # noqa: F401  (the command)
from engine.perf.planner import Plan, format_plan, plan, profile_backbone  # noqa: F401  (the public API)

if __name__ == "__main__":
    sys.exit(main())
