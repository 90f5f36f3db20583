"""ArcScale entry point: `deepspeed run.py --config ds_configs/r2060.json [--set key.path=value ...]`.

Also runs without a launcher (`python run.py --config ...`) as a world of one.
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
    args = parse_args(argv)
    from engine import config, dist

    try:
        cfg = config.load(args.config, args.overrides)
    except config.ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    dist.init(timeout_s=cfg.engine.train.dist_timeout_s)
    from engine.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
