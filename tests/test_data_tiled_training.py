"""The data spec's `tile` and `augment`: patches on the fly, and val mAP measured on whole scenes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from rkd.data.dataset import build_dataset, validate_data_spec
from rkd.data.tiling import tile_windows
from rkd.errors import SpecError
from rkd.train.evaluate import evaluate

UCAS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ucas50"
pytestmark = pytest.mark.skipif(not UCAS.is_dir(), reason="../shared/data/ucas50 not present")


def ucas_spec(**extra) -> dict:
    return validate_data_spec({"format": "ucas", "root": str(UCAS), "input_size": 256, **extra})


@pytest.mark.parametrize(
    "extra, path, needle",
    [
        ({"tile": {"size": 512, "overlap": 512}}, "tile.overlap", "smaller than tile.size"),
        ({"tile": {"size": 512, "stride": 3}}, "tile", "expected {size, overlap, min_area}"),
        ({"tile": {"min_area": 1.5}}, "tile.min_area", "in [0.0, 1.0]"),
        ({"augment": {"rot90": "yes"}}, "augment.rot90", "true or false"),
        ({"augment": {"scale": [1.5, 0.5]}}, "augment.scale", "0 < low <= high"),
        ({"augment": {"blur": 1}}, "augment", "keys among"),
    ],
)
def test_bad_tile_and_augment_entries_name_their_field(extra, path, needle):
    with pytest.raises(SpecError) as err:
        ucas_spec(**extra)
    assert err.value.path == path and needle in str(err.value)


def test_tiling_the_synthetic_set_is_refused():
    with pytest.raises(SpecError, match="tiling is for file formats"):
        validate_data_spec({"format": "synthetic", "input_size": 128, "tile": True})


def test_a_tiled_split_holds_every_window_of_every_scene():
    spec = ucas_spec(tile={"size": 512, "overlap": 128})
    dataset = build_dataset(spec, "val", train=False)
    scenes = dataset.scenes
    expected = [(i, w) for i, r in enumerate(scenes) for w in tile_windows(*r.image_size, 512, 128)]
    assert dataset.windows == expected and len(dataset) == len(expected) > len(scenes)
    for (scene, window), record in zip(dataset.windows, dataset.records):
        assert record.image_size == (window.height, window.width)
        assert record.image_id.startswith(scenes[scene].image_id + "__1__")


class PatchOracle(nn.Module):
    """Predicts each patch's own letterboxed ground truth, in the order evaluation asks for them.

    Whole objects score 1.0 and objects cut by the patch border 0.1, so the merge must
    keep the whole copy and the cut fragments may only add low-scored false positives.
    """

    def __init__(self, dataset) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # evaluation reads the device from a parameter
        self.answers = []
        for i in range(len(dataset)):
            sample = dataset[i]
            record = dataset.records[i]
            cut = record.difficult  # cut by the border (or difficult in the scene: ignored either way)
            self.answers.append(
                {"boxes": sample.boxes.float(), "labels": sample.labels.long(), "scores": torch.where(cut, 0.1, 1.0)}
            )

    def predict(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        out, self.answers = self.answers[: len(images)], self.answers[len(images) :]
        return out


def test_val_map_is_measured_on_whole_scenes_after_merging_patches():
    spec = ucas_spec(tile={"size": 512, "overlap": 200})
    dataset = build_dataset(spec, "val", train=False)
    validation = evaluate(PatchOracle(dataset), dataset, num_classes=2, batch_size=4)
    assert validation.num_images == len(dataset.scenes)  # scored per scene, not per patch
    assert validation.map == pytest.approx(1.0)
    gt_objects = sum(int((~r.difficult).sum()) for r in dataset.scenes)
    assert sum(validation.result.num_gt.values()) == gt_objects


def test_training_augmentations_keep_boxes_inside_the_input():
    spec = ucas_spec(augment={"flip": True, "rot90": True, "scale": [0.6, 1.4], "color": 0.3})
    dataset = build_dataset(spec, "train", train=True)
    torch.manual_seed(0)
    for i in range(6):
        sample = dataset[i]
        assert tuple(sample.image.shape) == (3, 256, 256) and sample.image.dtype == torch.uint8
        if len(sample.boxes):
            assert (sample.boxes[:, :2] >= -1).all() and (sample.boxes[:, :2] <= 257).all()
            assert len(sample.boxes) == len(sample.labels) == len(sample.difficult)
