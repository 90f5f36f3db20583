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
from typing import Mapping

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: the repository's packages

# arcface_torch's configs/ms1mv3_r50.py: its comment and its two groups of settings (the run, then the data), each
# value as the file writes it (Python source). The stand-in config below and the tests' recipes change a few.
MS1MV3_R50_COMMENT = """\
# make training faster
# our RAM is 256G
# mount -t tmpfs -o size=140G  tmpfs /train_tmp

"""
MS1MV3_R50_RUN = {
    "margin_list": "(1.0, 0.5, 0.0)", "network": '"r50"', "resume": "False", "output": "None",
    "embedding_size": "512", "sample_rate": "1.0", "fp16": "True", "momentum": "0.9", "weight_decay": "5e-4",
    "batch_size": "128", "lr": "0.1", "verbose": "2000", "dali": "False",
}
MS1MV3_R50_DATA = {
    "rec": '"/train_tmp/ms1m-retinaface-t1"', "num_classes": "93431", "num_image": "5179510", "num_epoch": "20",
    "warmup_epoch": "0", "val_targets": "['lfw', 'cfp_fp', \"agedb_30\"]",
}
STAND_IN_COMMENT = """\
# A CPU-sized stand-in for arcface_torch's configs/ms1mv3_{network}.py (written by ArcScale's
# scripts/make_walkthrough_inputs.py): the same keys, a 64-image dataset.
"""


def config_text(*groups: Mapping[str, str], comment: str = "") -> str:
    """An arcface_torch config file (the layout of its configs/*.py): the edict import, a blank line, `comment` as
    given, `config = edict()`, then a `config.<key> = <value>` line per setting of each group (the value as
    written, Python source), a blank line between groups."""
    body = "\n".join("".join(f"config.{key} = {value}\n" for key, value in group.items()) for group in groups)
    return f"from easydict import EasyDict as edict\n\n{comment}config = edict()\n{body}"


def stand_in_config(network: str, rec: str, classes: int, images: int) -> str:
    """The stand-in of arcface_torch's configs/ms1mv3_<network>.py: batch 4, 2 epochs, val_targets ['lfw']."""
    return config_text(
        {**MS1MV3_R50_RUN, "network": f'"{network}"', "batch_size": "4"},
        {**MS1MV3_R50_DATA, "rec": f'"{rec}"', "num_classes": str(classes), "num_image": str(images),
         "num_epoch": "2", "val_targets": "['lfw']"},
        comment=STAND_IN_COMMENT.format(network=network))


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
    (out / "configs" / f"ms1mv3_{network}.py").write_text(stand_in_config(
        network, rec.as_posix(), IDENTITIES, IDENTITIES * IMAGES_PER_IDENTITY))
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
