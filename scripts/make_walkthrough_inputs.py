#!/usr/bin/env python
"""CPU-sized stand-ins for the files the README's arcface_torch walkthrough starts from, in their formats.

    python scripts/make_walkthrough_inputs.py --out arcface_torch [--network r18] [--seed 0]

Writes under OUT (an arcface_torch checkout's layout, plus the data and weights a user brings):

    OUT/configs/ms1mv3_<network>.py            an arcface_torch config (edict, as its configs/*.py), naming the rec
                                               below, batch 4, 2 epochs, no warm-up, val_targets ['lfw']
    OUT/ms1m-retinaface-t1/                    an insightface RecordIO set (train.rec/.idx/property) of 8 generated
                                               identities x 8 faces (dali_pipes.make_demo) and lfw.bin: 20 pairs
                                               of 10 other identities
    OUT/ms1mv3_arcface_<network>/backbone.pth  arcface_torch's backbone state_dict (the same keys), initialised
                                               with the seed, not trained
    OUT/IJBC/                                  an IJB-C-shaped set: meta/ijbc_*.txt and loose_crop/*.png
                                               (engine.eval.ijb_synthetic: 5 identities, 15 templates)

Nothing is downloaded. The real files: arcface_torch's configs/ from its repository, backbone.pth from its
model zoo, the rec and .bin files from insightface's datasets page, IJB-C from NIST.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: the repository's packages

CONFIG = '''from easydict import EasyDict as edict

# A CPU-sized stand-in for arcface_torch's configs/ms1mv3_{network}.py (written by ArcScale's
# scripts/make_walkthrough_inputs.py): the same keys, a 64-image dataset.
config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "{network}"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 1.0
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 4
config.lr = 0.1
config.verbose = 2000
config.dali = False

config.rec = "{rec}"
config.num_classes = {classes}
config.num_image = {images}
config.num_epoch = 2
config.warmup_epoch = 0
config.val_targets = ['lfw']
'''
IDENTITIES, IMAGES_PER_IDENTITY = 8, 8


def make_inputs(out: Path, network: str = "r18", seed: int = 0) -> None:
    """Write the four stand-ins under `out` (see the module docstring); an existing `out` is refused."""
    import torch

    import backbones
    from dali_pipes.make_demo import make_demo
    from engine.eval.ijb_synthetic import write_ijbc

    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out}: exists and is not empty; choose a new folder")
    if network not in backbones.list_backbones():
        raise ValueError(f"--network: expected one of {', '.join(backbones.list_backbones())}, got {network!r}")
    rec = out / "ms1m-retinaface-t1"
    make_demo(rec, identities=IDENTITIES, images_per_identity=IMAGES_PER_IDENTITY, eval_identities=10,
              eval_pairs=20, seed=seed, workers=1)
    shutil.copyfile(rec / "val.bin", rec / "lfw.bin")
    (out / "configs").mkdir(parents=True)
    (out / "configs" / f"ms1mv3_{network}.py").write_text(CONFIG.format(
        network=network, rec=rec.as_posix(), classes=IDENTITIES, images=IDENTITIES * IMAGES_PER_IDENTITY))
    torch.manual_seed(seed)
    weights = out / f"ms1mv3_arcface_{network}" / "backbone.pth"
    weights.parent.mkdir()
    torch.save(backbones.build_backbone(network, embedding_size=512).state_dict(), weights)
    write_ijbc(out / "IJBC", seed=seed)
    print(f"wrote {out}: configs/ms1mv3_{network}.py, {rec.name}/ (train.rec, lfw.bin), "
          f"ms1mv3_arcface_{network}/backbone.pth (untrained), IJBC/")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the folder to create, e.g. arcface_torch")
    parser.add_argument("--network", default="r18", help="backbone of the config and the .pth (default r18)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        make_inputs(Path(args.out), args.network, args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
