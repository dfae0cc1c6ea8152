"""One preprocessing contract: a file gives the same model input through the training,
evaluation and inference paths, for every ``lung_view``.

The images are real X-rays from ``../shared/data/cxr-real`` (linked, not copied, into a
temporary dataset) so that the lung segmenter finds real lungs for ``crop`` and ``mask``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from core import lungs
from core.config import AugmentConfig, DataConfig, PreprocessConfig, RunConfig, TrainConfig, to_dict
from core.inference import Predictor
from core.model import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, build_model
from core.scoring import evaluation_dataset
from core.train import Trainer

PER_CLASS = 8


@pytest.fixture(scope="module")
def linked_dataset(tmp_path_factory, real_dir):
    root = tmp_path_factory.mktemp("contract") / "data"
    for cls_dir in sorted(p for p in real_dir.iterdir() if (p / "images").is_dir()):
        dst = root / cls_dir.name / "images"
        dst.mkdir(parents=True)
        for src in sorted((cls_dir / "images").glob("*.png"))[:PER_CLASS]:
            (dst / src.name).symlink_to(src)
    return root


@pytest.mark.parametrize("view", ["none", "crop", "mask"])
def test_training_evaluation_and_inference_give_the_same_tensor(view, linked_dataset, tmp_path):
    pp = PreprocessConfig(img_size=96, lung_view=view)
    if view != "none":
        pp = replace(pp, segmenter_sha256=lungs.file_sha256(lungs.DEFAULT_SEGMENTER_PATH))
    cfg = RunConfig(data=DataConfig(data_dir=str(linked_dataset)), preprocess=pp,
                    augment=AugmentConfig(p=0.0),  # the training path minus its random part
                    train=TrainConfig(output=str(tmp_path / "run"), weights="none", seed=0))
    trainer = Trainer(cfg, progress=False)
    trainer.prepare_data()
    rows = trainer.manifest.split("train")[:3]  # 3 files, a different class order each time

    model = build_model(len(trainer.classes), weights="none", arch="resnet18")
    ckpt = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "arch": "resnet18",
            "dropout": 0.0, "classes": list(trainer.classes), "preprocess": to_dict(pp),
            "state_dict": model.state_dict()}
    predictor = Predictor(ckpt, runtime="torch")
    evaluation = evaluation_dataset(linked_dataset, rows, trainer.classes, pp)

    for i, row in enumerate(rows):
        x_train = trainer.train_ds[i][0]
        x_plain = trainer.train_plain_ds[i][0]
        x_eval = evaluation[i][0]
        prep = predictor.prepare(linked_dataset / row["path"])
        assert x_train.shape == (3, 96, 96)
        assert torch.equal(x_train, x_plain)
        assert torch.equal(x_train, x_eval)
        assert torch.equal(x_train, prep.x), (view, row["path"])
        if view != "none":  # the view really cut the image to its lungs
            top, left, bottom, right = prep.box
            assert (bottom - top) * (right - left) < 0.95 * prep.gray.size
            assert prep.lung_mask is not None and prep.lung_mask.any()
    if view == "mask":  # outside the dilated lung field the input is one flat value
        _, counts = np.unique(prep.x[0].numpy(), return_counts=True)
        assert counts.max() / prep.x[0].numel() > 0.05
