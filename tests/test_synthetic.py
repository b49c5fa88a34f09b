"""The synthetic benchmark: the generator's ground truth and the shipped model."""

from __future__ import annotations

import os

import pytest
import torch

from salience import models
from salience.metrics import synthetic
from salience.metrics.synthetic import CLASSES, SyntheticShapes, generate


@pytest.fixture(scope="module")
def data() -> synthetic.SyntheticSet:
    return generate(120, seed=7)


def _tight(mask: torch.Tensor) -> list[int]:
    ys, xs = mask.nonzero(as_tuple=True)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _shape_of(mask: torch.Tensor, colours: int) -> str:
    """Name the shape of a mask from its geometry alone (independent of the generator's code)."""
    x0, y0, x1, y1 = _tight(mask)
    m = mask[y0:y1, x0:x1]
    h, w = m.shape
    fill = float(m.float().mean())
    if not bool(m[h // 2, w // 2]):
        return "ring"
    if fill > 0.99:
        return "stripes" if colours == 2 else "square"
    top, bottom = int(m[0].sum()), int(m[-1].sum())
    if top < 0.3 * w and bottom > 0.9 * w:
        return "triangle"
    return "cross" if fill < 0.67 else "disc"


def test_same_seed_same_images_in_any_grouping(data):
    again = generate(120, seed=7)
    for name in ("images", "labels", "boxes", "masks", "distractor_labels", "distractor_boxes"):
        assert torch.equal(getattr(data, name), getattr(again, name)), name
    part = generate(5, seed=7, start=40)
    assert torch.equal(part.images, data.images[40:45])
    assert torch.equal(part.masks, data.masks[40:45])
    dataset = SyntheticShapes(120, seed=7)
    image, label, box, mask = dataset[93]
    assert torch.equal(image, data.images[93])
    assert int(label) == int(data.labels[93])
    assert torch.equal(box, data.boxes[93])
    assert torch.equal(mask, data.masks[93])
    assert torch.equal(dataset[-1][0], data.images[-1])
    other = generate(20, seed=8)
    assert not torch.equal(other.images, data.images[:20])


def test_images_are_valid_and_every_class_occurs(data):
    assert data.images.shape == (120, 3, 64, 64)
    assert data.images.dtype == torch.float32
    assert float(data.images.min()) >= 0.0
    assert float(data.images.max()) <= 1.0
    counts = torch.bincount(data.labels, minlength=len(CLASSES))
    assert bool((counts >= 8).all()), counts
    distractors = (data.distractor_labels >= 0).sum(dim=1)
    assert set(distractors.tolist()) == {0, 1, 2}


def test_box_is_the_tight_box_of_the_mask_and_the_mask_is_the_drawn_object(data):
    for i in range(len(data)):
        mask = data.masks[i]
        assert data.boxes[i].tolist() == _tight(mask)
        x0, y0, x1, y1 = data.boxes[i].tolist()
        assert synthetic.TARGET_SIDE[0] - 1 <= max(x1 - x0, y1 - y0) <= synthetic.TARGET_SIDE[1]
        pixels = data.images[i][:, mask].T  # (P, 3): flat colours only
        colours = torch.unique(pixels, dim=0)
        assert len(colours) in (1, 2)
        # The object's colour differs from every pixel just outside its mask that is background
        # (strokes may touch it, but a ring of background surrounds most of the object).
        grown = torch.nn.functional.max_pool2d(mask[None, None].float(), 3, 1, 1)[0, 0] > 0
        rim = data.images[i][:, grown & ~mask].T
        same = (rim[:, None, :] == colours[None]).all(dim=2).any(dim=1)
        assert float(same.float().mean()) < 0.2


def test_labels_are_the_shape_of_the_large_object(data):
    for i in range(len(data)):
        mask = data.masks[i]
        colours = len(torch.unique(data.images[i][:, mask].T, dim=0))
        assert _shape_of(mask, colours) == CLASSES[int(data.labels[i])], i


def test_distractors_are_smaller_other_classes_apart_from_the_target(data):
    for i in range(len(data)):
        label = int(data.labels[i])
        tx0, ty0, tx1, ty1 = data.boxes[i].tolist()
        kinds = [k for k in data.distractor_labels[i].tolist() if k >= 0]
        assert label not in kinds
        assert len(set(kinds)) == len(kinds)
        for slot, _ in enumerate(kinds):
            x0, y0, x1, y1 = data.distractor_boxes[i, slot].tolist()
            assert max(x1 - x0, y1 - y0) <= synthetic.DISTRACTOR_SIDE[1]
            assert max(x1 - x0, y1 - y0) < min(tx1 - tx0, ty1 - ty0) * 0.7
            apart = x1 <= tx0 or tx1 <= x0 or y1 <= ty0 or ty1 <= y0
            assert apart, (i, slot)
            assert not bool(data.masks[i, y0:y1, x0:x1].any())


def test_shape_masks_by_hand():
    disc = synthetic.shape_mask("disc", 0, 0, 4, size=4)
    assert disc.tolist() == [
        [False, True, True, False],
        [True, True, True, True],
        [True, True, True, True],
        [False, True, True, False],
    ]
    cross = synthetic.shape_mask("cross", 0, 0, 6, size=6)
    assert cross.sum() == 20  # arms of width 2 (|u - 1/2| <= 1/6 of 6 px): 12 + 12 - 4
    triangle = synthetic.shape_mask("triangle", 0, 0, 5, size=5)
    assert triangle.sum(axis=1).tolist() == [1, 1, 3, 3, 5]
    assert synthetic.shape_mask("square", 1, 2, 3, size=6).sum() == 9
    ring = synthetic.shape_mask("ring", 0, 0, 20, size=20)
    assert not ring[10, 10]
    assert ring[0, 10]
    with pytest.raises(ValueError, match="unknown shape"):
        synthetic.shape_mask("star", 0, 0, 4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n must be >= 1"):
        generate(0)
    with pytest.raises(TypeError, match="seed must be an int"):
        generate(3, seed=1.5)
    with pytest.raises(ValueError, match="start must be >= 0"):
        generate(3, start=-1)
    with pytest.raises(IndexError):
        SyntheticShapes(3)[3]


# -- the shipped model -----------------------------------------------------------------------


def test_shipped_weights_are_small_and_load_offline():
    path = models.synthetic_weights_path()
    assert os.path.getsize(path) < 200_000
    model = models.synthetic_cnn()
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    fresh = models.synthetic_cnn(pretrained=False)
    assert not torch.equal(fresh.fc.weight, model.fc.weight)


@pytest.mark.parametrize("seed", [0, 2])
def test_shipped_model_is_accurate_on_held_out_images(seed):
    model = models.synthetic_cnn()
    held_out = generate(200, seed=seed)
    with torch.no_grad():
        accuracy = float((model(held_out.images).argmax(1) == held_out.labels).float().mean())
    assert accuracy >= 0.95


def test_model_uses_the_object_not_the_clutter():
    """Cover the object's box with a flat patch: the label goes away (but for "square")."""
    model = models.synthetic_cnn()
    held_out = generate(60, seed=3)
    x = held_out.images.clone()
    for i, (x0, y0, x1, y1) in enumerate(held_out.boxes.tolist()):
        x[i, :, y0:y1, x0:x1] = held_out.images[i].mean(dim=(1, 2), keepdim=True)
    with torch.no_grad():
        kept = model(x).argmax(1) == held_out.labels
    # A flat box is itself a square: leave those images out. Chance is about 1/5.
    other = held_out.labels != CLASSES.index("square")
    assert float(kept[other].float().mean()) < 0.3
