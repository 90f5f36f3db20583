"""IJB-B / IJB-C 1:1 verification of a trained backbone (engine.eval.ijb_eval).

    python -m engine.eval_ijb --model outputs/r50/model.pt --backbone r50 --root /data/IJBC --target IJBC
"""
import sys

from engine.eval.ijb_eval import embed_faces, evaluate, main, write_results  # noqa: F401  (the public API)

if __name__ == "__main__":
    sys.exit(main())
