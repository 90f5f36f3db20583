"""Convert an arcface_torch config file into an ArcScale run config (engine.config.arcface_torch).

    python -m engine.convert_config arcface_torch/configs/ms1mv3_r50.py -o ds_configs/ms1mv3_r50.json --world-size 8
"""
import sys

from engine.config.arcface_torch import convert, main, parse_config_file  # noqa: F401  (the public API)

if __name__ == "__main__":
    sys.exit(main())
