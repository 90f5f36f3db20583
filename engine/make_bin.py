"""Your own verification pairs as an insightface ``.bin`` (engine.eval.verification_bin).

    python -m engine.make_bin --images DIR --pairs PAIRS.txt --out X.bin
    python -m engine.make_bin --images DIR --num-pairs N --seed S --out X.bin
"""
import sys

from engine.eval.verification_bin import draw_pairs, encode_pairs, main, read_pairs, write_bin  # noqa: F401  (the public API)

if __name__ == "__main__":
    sys.exit(main())
