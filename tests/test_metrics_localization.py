"""Localization metrics: known answers, conventions, errors, and parity with Quantus."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch

from salience import Attribution
from salience.metrics import (
    box_from_map,
    iou,
    localization_error,
    pointing_energy,
    pointing_game,
)


def _mask(h: int, w: int, box: tuple[int, int, int, int]) -> torch.Tensor:
    x0, y0, x1, y1 = box
    m = torch.zeros(h, w, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def _reference_box(m: np.ndarray, threshold: float, connectivity: int) -> list[int]:
    """Breadth-first search: the box of the largest component, first-pixel tie break."""
    h, w = m.shape
    if m.max() <= 0:
        return [0, 0, 0, 0]
    fg = m >= threshold * m.max()
    seen = np.zeros_like(fg)
    steps = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    if connectivity == 4:
        steps = [s for s in steps if abs(s[0]) + abs(s[1]) == 1]
    best: list[tuple[int, int]] = []
    for i in range(h):
        for j in range(w):
            if fg[i, j] and not seen[i, j]:
                comp, queue = [], deque([(i, j)])
                seen[i, j] = True
                while queue:
                    y, x = queue.popleft()
                    comp.append((y, x))
                    for dy, dx in steps:
                        v, u = y + dy, x + dx
                        if 0 <= v < h and 0 <= u < w and fg[v, u] and not seen[v, u]:
                            seen[v, u] = True
                            queue.append((v, u))
                if len(comp) > len(best):
                    best = comp
    ys = [p[0] for p in best]
    xs = [p[1] for p in best]
    return [min(xs), min(ys), max(xs) + 1, max(ys) + 1]


# --------------------------------------------------------------------------- box_from_map


def test_map_equal_to_mask_gives_its_box_and_a_hit() -> None:
    box = (3, 5, 11, 9)
    mask = _mask(16, 20, box)
    maps = mask.float()[None]
    found = box_from_map(maps)
    assert found.tolist() == [list(box)]
    assert found.dtype == torch.long
    assert iou(found, torch.tensor([box])).item() == pytest.approx(1.0)
    assert pointing_game(maps, torch.tensor([box]), tolerance=0).item() == 1.0
    assert pointing_game(maps, mask[None], tolerance=0).item() == 1.0


def test_two_blobs_give_the_larger_one() -> None:
    maps = torch.zeros(1, 20, 20)
    maps[0, 1:4, 1:4] = 1.0  # 9 pixels, the higher peak
    maps[0, 10:15, 8:18] = 0.5  # 50 pixels
    assert box_from_map(maps).tolist() == [[8, 10, 18, 15]]


def test_threshold_keeps_a_blob_at_and_drops_a_blob_below_it() -> None:
    maps = torch.zeros(2, 12, 12)
    maps[:, 0, 0] = 1.0  # the peak, alone
    maps[:, 5:10, 5:10] = 0.15  # 25 pixels exactly at 15 % of the maximum: kept
    maps[1, 5:10, 5:10] = 0.149  # just below: excluded, the peak is the only region
    assert box_from_map(maps, threshold=0.15).tolist() == [[5, 5, 10, 10], [0, 0, 1, 1]]


def test_connectivity_four_splits_a_diagonal() -> None:
    maps = torch.zeros(1, 6, 6)
    for k in range(4):  # a diagonal of 4 pixels
        maps[0, 1 + k, 1 + k] = 1.0
    maps[0, 0, 3:6] = 1.0  # a 3-pixel row, disjoint under both connectivities
    assert box_from_map(maps, connectivity=8).tolist() == [[1, 1, 5, 5]]
    assert box_from_map(maps, connectivity=4).tolist() == [[3, 0, 6, 1]]


@pytest.mark.parametrize("connectivity", [4, 8])
def test_box_from_map_matches_breadth_first_search(connectivity: int) -> None:
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(12, 23, 17, generator=g) - 0.3
    maps[3] = -1.0  # no positive value
    with pytest.warns(UserWarning, match="samples 3"):
        got = box_from_map(maps, threshold=0.6, connectivity=connectivity)
    want = [_reference_box(m.numpy(), 0.6, connectivity) for m in maps]
    assert got.tolist() == want


def test_a_spiral_converges() -> None:
    # A long thin path: label propagation alone needs one step per pixel of path.
    h = w = 41
    m = torch.zeros(h, w)
    top, left, bottom, right = 0, 0, h - 1, w - 1
    while top <= bottom and left <= right:
        m[top, left : right + 1] = 1
        m[top : bottom + 1, right] = 1
        if top + 2 <= bottom:
            m[bottom, left : right + 1] = 1
        if left + 2 <= right and top + 2 <= bottom:
            m[top + 2 : bottom + 1, left] = 1
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
    m[1, 0] = 0  # keep it one thin path
    got = box_from_map(m[None], connectivity=4).tolist()
    assert got == [_reference_box(m.numpy(), 0.15, 4)]


def test_empty_map_gives_empty_box_and_warns() -> None:
    maps = torch.zeros(3, 8, 8)
    maps[1, 2:4, 2:4] = 1
    with pytest.warns(UserWarning, match=r"samples 0, 2.*\(0, 0, 0, 0\)"):
        got = box_from_map(maps)
    assert got.tolist() == [[0, 0, 0, 0], [2, 2, 4, 4], [0, 0, 0, 0]]


def test_box_from_map_takes_attributions_and_channel_axis() -> None:
    values = torch.zeros(2, 1, 9, 9)
    values[0, 0, 1:3, 4:7] = 1
    values[1, 0, 6:9, 0:2] = 2
    attr = Attribution(
        values=values, target=None, scores=torch.zeros(2), method="cam", reduction="none"
    )
    want = [[4, 1, 7, 3], [0, 6, 2, 9]]
    assert box_from_map(attr).tolist() == want
    assert box_from_map(values).tolist() == want


# --------------------------------------------------------------------------- iou


def test_iou_hand_computed() -> None:
    a = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 4, 4], [0, 0, 2, 2]])
    b = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [5, 0, 15, 10], [2, 2, 6, 6], [2, 0, 4, 2]])
    # identical: 1; disjoint: 0; half overlap: 50 / 150; corner: 4 / 28; touching: 0
    want = torch.tensor([1.0, 0.0, 1 / 3, 4 / 28, 0.0])
    torch.testing.assert_close(iou(a, b), want)
    torch.testing.assert_close(iou(b, a), want)


def test_iou_of_empty_boxes_is_zero() -> None:
    e = torch.zeros(2, 4)
    torch.testing.assert_close(iou(e, torch.tensor([[0.0, 0, 0, 0], [0, 0, 3, 3]])), torch.zeros(2))


def test_iou_errors() -> None:
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        iou(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="2 boxes for 3 samples"):
        iou(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="x1 < x0"):
        iou(torch.tensor([[5, 0, 1, 1]]), torch.tensor([[0, 0, 1, 1]]))
    with pytest.raises(ValueError, match="NaN"):
        iou(torch.tensor([[0.0, 0, float("nan"), 1]]), torch.tensor([[0.0, 0, 1, 1]]))


# --------------------------------------------------------------------------- pointing game


@pytest.mark.parametrize(
    ("tolerance", "hit"), [(15, 1.0), (10, 1.0), (9.9, 0.0), (5, 0.0), (0, 0.0)]
)
def test_tolerance_around_a_box(tolerance: float, hit: float) -> None:
    maps = torch.zeros(1, 40, 60)
    maps[0, 20, 44] = 1.0  # 10 px right of the last column (34) of the box
    box = torch.tensor([[10, 10, 35, 30]])
    assert pointing_game(maps, box, tolerance=tolerance).item() == hit
    mask = _mask(40, 60, (10, 10, 35, 30))[None]
    assert pointing_game(maps, mask, tolerance=tolerance).item() == hit


def test_a_tolerance_beyond_the_map_is_a_hit_anywhere() -> None:
    """1e200 pixels passed the finite check, then overflowed when squared."""
    maps = torch.zeros(1, 8, 8)
    maps[0, 7, 7] = 1
    assert pointing_game(maps, torch.tensor([[0, 0, 2, 2]]), tolerance=1e200).item() == 1.0


def test_tolerance_is_euclidean() -> None:
    maps = torch.zeros(1, 40, 40)
    maps[0, 28, 28] = 1.0  # (6, 8) px off the corner pixel (22, 20): distance 10
    box = torch.tensor([[5, 5, 21, 23]])  # last column 20, last row 22
    assert pointing_game(maps, box, tolerance=10).item() == 1.0
    assert pointing_game(maps, box, tolerance=9.99).item() == 0.0


def test_pointing_takes_the_first_maximum() -> None:
    maps = torch.zeros(2, 10, 10)
    maps[:, 2, 7] = 1.0  # first in row-major order
    maps[:, 6, 1] = 1.0
    boxes = torch.tensor([[7, 2, 8, 3], [1, 6, 2, 7]])
    assert pointing_game(maps, boxes, tolerance=0).tolist() == [1.0, 0.0]


def test_constant_map_warns() -> None:
    with pytest.warns(UserWarning, match="constant"):
        got = pointing_game(torch.ones(1, 5, 5), torch.tensor([[0, 0, 1, 1]]), tolerance=0)
    assert got.tolist() == [1.0]


# --------------------------------------------------------------------------- energy


def test_energy_of_mask_complement_and_constant() -> None:
    mask = _mask(10, 20, (2, 3, 8, 7))  # 24 of 200 pixels
    assert pointing_energy(mask.float()[None], mask[None]).item() == pytest.approx(1.0)
    assert pointing_energy((~mask).float()[None], mask[None]).item() == 0.0
    assert pointing_energy(torch.full((1, 10, 20), 3.0), mask[None]).item() == pytest.approx(
        24 / 200
    )
    box = torch.tensor([[2, 3, 8, 7]])
    assert pointing_energy(torch.full((1, 10, 20), 3.0), box).item() == pytest.approx(24 / 200)


def test_energy_ignores_negative_values_and_warns_without_mass() -> None:
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, 0] = 1.0
    maps[0, 3, 3] = -5.0  # outside, negative: ignored
    maps[1] = -1.0
    box = torch.tensor([[0, 0, 2, 2], [0, 0, 2, 2]])
    with pytest.warns(UserWarning, match="samples 1 have no positive mass"):
        got = pointing_energy(maps, box)
    assert got.tolist() == [1.0, 0.0]


# --------------------------------------------------------------------------- localization error


def test_localization_error_known_answers() -> None:
    box = (4, 4, 12, 12)
    maps = _mask(16, 16, box).float()[None].repeat(4, 1, 1)
    true_class = torch.tensor([3, 3, 3, 3])
    top5 = torch.tensor(
        [
            [3, 1, 2, 4, 5],  # right class, good box
            [1, 2, 3, 4, 5],  # class only in the top 5
            [0, 1, 2, 4, 5],  # wrong class
            [3, 1, 2, 4, 5],  # right class, box below 0.5 IoU
        ]
    )
    gts = torch.tensor([box, box, box, (0, 0, 8, 8)])  # last: IoU 16/112
    torch.testing.assert_close(
        localization_error(maps, top5, true_class, gts, top_k=1),
        torch.tensor([0.0, 1.0, 1.0, 1.0]),
    )
    torch.testing.assert_close(
        localization_error(maps, top5, true_class, gts, top_k=5),
        torch.tensor([0.0, 0.0, 1.0, 1.0]),
    )
    # boxes instead of maps give the same
    boxes = torch.tensor([box] * 4)
    torch.testing.assert_close(
        localization_error(boxes, top5, true_class, gts, top_k=5),
        torch.tensor([0.0, 0.0, 1.0, 1.0]),
    )


def test_localization_error_iou_threshold_boundary() -> None:
    pred = torch.tensor([[0, 0, 10, 10]])
    gt = torch.tensor([[0, 0, 5, 10]])  # IoU exactly 0.5
    cls = torch.tensor([1])
    assert localization_error(pred, cls, cls, gt).item() == 0.0
    assert localization_error(pred, cls, cls, gt, iou_threshold=0.51).item() == 1.0


def test_localization_error_any_of_several_ground_truth_boxes() -> None:
    pred = torch.tensor([[0, 0, 4, 4], [0, 0, 4, 4]])
    cls = torch.tensor([7, 7])
    gts = [
        torch.tensor([[10, 10, 14, 14], [0, 0, 4, 5]]),  # second matches
        torch.tensor([[10, 10, 14, 14]]),
    ]
    assert localization_error(pred, cls, cls, gts).tolist() == [0.0, 1.0]


def test_localization_error_checks() -> None:
    maps = torch.rand(2, 8, 8)
    cls = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="leave the 8x8"):
        localization_error(maps, cls, cls, torch.tensor([[0, 0, 9, 4], [0, 0, 2, 2]]))
    with pytest.raises(ValueError, match="top_k=5 needs at least 5"):
        localization_error(maps, cls, cls, torch.tensor([[0, 0, 2, 2]] * 2), top_k=5)
    with pytest.raises(ValueError, match="true_boxes\\[1\\] is empty"):
        localization_error(maps, cls, cls, [torch.tensor([[0, 0, 2, 2]]), torch.zeros(0, 4)])
    with pytest.raises(TypeError, match="integer class indices"):
        localization_error(maps, cls.float(), cls, torch.tensor([[0, 0, 2, 2]] * 2))


# --------------------------------------------------------------------------- batch and errors


def test_batch_equals_one_by_one() -> None:
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(6, 20, 24, generator=g) ** 4
    boxes = torch.tensor(
        [
            [0, 0, 5, 5],
            [3, 4, 20, 18],
            [10, 2, 24, 20],
            [0, 10, 12, 20],
            [5, 5, 6, 6],
            [1, 1, 23, 19],
        ]
    )
    cls = torch.arange(6)
    top5 = torch.stack([cls, cls + 1, cls + 2, cls + 3, cls + 4], dim=1).roll(1, dims=1)
    whole = {
        "box": box_from_map(maps),
        "pg": pointing_game(maps, boxes),
        "pg0": pointing_game(maps, boxes, tolerance=0),
        "en": pointing_energy(maps, boxes),
        "le": localization_error(maps, top5, cls, boxes, top_k=5, threshold=0.3),
    }
    for i in range(6):
        s = slice(i, i + 1)
        assert torch.equal(box_from_map(maps[s]), whole["box"][s])
        assert torch.equal(pointing_game(maps[s], boxes[s]), whole["pg"][s])
        assert torch.equal(pointing_game(maps[s], boxes[s], tolerance=0), whole["pg0"][s])
        torch.testing.assert_close(pointing_energy(maps[s], boxes[s]), whole["en"][s])
        single = localization_error(maps[s], top5[s], cls[s], boxes[s], top_k=5, threshold=0.3)
        assert torch.equal(single, whole["le"][s])
    # the values are not all alike, so the comparison means something
    assert 0 < whole["pg0"].sum() < 6


def test_clear_errors() -> None:
    maps = torch.rand(2, 8, 8)
    box = torch.tensor([[0, 0, 4, 4], [0, 0, 4, 4]])
    nan = maps.clone()
    nan[1, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite values in samples 1"):
        pointing_game(nan, box)
    with pytest.raises(ValueError, match="leave the 8x8"):
        pointing_game(maps, torch.tensor([[0, 0, 4, 4], [-1, 0, 4, 4]]))
    with pytest.raises(ValueError, match=r"empty .* samples 1"):
        pointing_energy(maps, torch.tensor([[0, 0, 4, 4], [2, 2, 2, 6]]))
    empty = torch.zeros(2, 8, 8, dtype=torch.bool)
    empty[0, 1, 1] = True
    with pytest.raises(ValueError, match=r"empty .* samples 1"):
        pointing_game(maps, empty)
    with pytest.raises(TypeError, match="bool"):
        pointing_game(maps, empty.float())
    with pytest.raises(ValueError, match="does not match"):
        pointing_game(maps, empty[:, :4])
    with pytest.raises(ValueError, match="3 boxes for 2 samples"):
        pointing_game(maps, torch.tensor([[0, 0, 4, 4]] * 3))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        box_from_map(torch.rand(8, 8))
    with pytest.raises(ValueError, match="threshold must lie in"):
        box_from_map(maps, threshold=1.5)
    with pytest.raises(ValueError, match="whole-pixel"):
        pointing_game(maps, torch.tensor([[0.0, 0, 4.5, 4], [0, 0, 4, 4]]))
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(maps, box, tolerance=-1)


# --------------------------------------------------------------------------- Quantus


def test_parity_with_quantus() -> None:
    quantus = pytest.importorskip("quantus")
    g = torch.Generator().manual_seed(2)
    n, h, w = 16, 14, 18
    maps = torch.rand(n, h, w, generator=g)
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    for i in range(n):
        y0, x0 = (
            int(torch.randint(0, h - 4, (1,), generator=g)),
            int(torch.randint(0, w - 4, (1,), generator=g)),
        )
        masks[i, y0 : y0 + 5, x0 : x0 + 6] = True
        if i % 2:  # put the maximum inside the region for half the samples
            maps[i] += 0.5 * masks[i]
    a = maps[:, None].numpy()
    s = masks[:, None].numpy().astype(np.float32)
    x = np.zeros((n, 1, h, w), dtype=np.float32)
    y = np.zeros(n, dtype=np.int64)
    kw = {"model": None, "x_batch": x, "y_batch": y, "a_batch": a, "s_batch": s}
    pg = quantus.PointingGame(normalise=False, abs=False, disable_warnings=True)
    ours_pg = pointing_game(maps, masks, tolerance=0)
    assert 0 < ours_pg.sum() < n
    np.testing.assert_array_equal(np.asarray(pg(**kw), dtype=np.float64), ours_pg.double().numpy())
    rma = quantus.RelevanceMassAccuracy(normalise=False, abs=False, disable_warnings=True)
    np.testing.assert_allclose(
        np.asarray(rma(**kw), dtype=np.float64),
        pointing_energy(maps, masks).double().numpy(),
        rtol=1e-5,
    )


def test_sums_and_areas_do_not_overflow_the_maps_dtype():
    """A float16 map of 224² twos sums past float16's range; float32 areas past 1e19 too."""
    from salience.metrics import iou, pointing_energy

    maps = torch.full((1, 224, 224), 2.0, dtype=torch.float16)
    box = torch.tensor([[0, 0, 112, 112]])
    energy = pointing_energy(maps, box)
    assert energy.dtype == torch.float16
    assert float(energy) == 0.25
    huge = torch.tensor([[0.0, 0.0, 1e20, 1e20]])
    assert float(iou(huge, huge)) == 1.0
