"""Memory and FLOPs planner (engine.perf.planner).

    python -m engine.plan --config ds_configs/r2060.json --world-size 64 --gpu-mem-gb 80
"""
import sys

from engine.perf.planner import Plan, format_plan, main, plan, profile_backbone  # noqa: F401  (the public API)

if __name__ == "__main__":
    sys.exit(main())
