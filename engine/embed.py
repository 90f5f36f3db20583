"""Embeddings of a folder of images or a rec from a trained backbone, as an .npz (engine.eval.embed_cli).

    python -m engine.embed --model outputs/run/model.pt --images DIR --out embeddings.npz
"""
import sys

from engine.eval.embed_cli import embed_images, list_images, main  # noqa: F401  (the public API)

if __name__ == "__main__":
    sys.exit(main())
