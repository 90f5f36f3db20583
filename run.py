"""ArcScale entry point: `deepspeed run.py --config ds_configs/r2060.json [--set key.path=value ...]`.

Also runs under `torchrun` and without a launcher (`python run.py --config ...`, a world of one).
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config (JSON or YAML), e.g. ds_configs/r50.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a config key (repeatable); values parse as JSON when they can")
    # The deepspeed launcher passes --local_rank; the rank is read from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Load and check the config, start the process group, train, close. Any exception on any rank ends the
    whole job at once with that rank's message (engine.runtime.dist.fail_fast), never in a barrier.

    Exit status: 0 finished, 1 error, 2 config error, 3 (engine.runtime.faults.EXIT_PREEMPTED) stopped by SIGTERM/SIGINT
    or a dead launcher after writing a checkpoint of the step every rank stopped at.
    """
    args = parse_args(argv)
    from engine import config

    cfg = config.load_or_report(args.config, args.overrides)  # every config check, before distributed start-up
    if cfg is None:
        return config.CONFIG_ERROR_EXIT
    from engine.train.build import run_job

    return run_job(cfg)


if __name__ == "__main__":
    sys.exit(main())
