"""Tests of salience.viz: normalization, colors, overlays, the guided rendering, grids, reprs."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import salience
from salience import viz
from salience.attribution import Attribution


def _attribution(values: torch.Tensor, method: str = "gradient", reduction="abs_max"):
    n = values.shape[0]
    return Attribution(
        values=values,
        target=torch.zeros(n, dtype=torch.long),
        scores=torch.zeros(n),
        method=method,
        reduction=reduction,
    )


# -- normalize -------------------------------------------------------------------------------


def test_normalize_signed_is_symmetric_about_zero():
    m = np.array([[-2.0, -1.0], [0.0, 1.0]])
    out = viz.normalize(m, percentile=None)
    np.testing.assert_allclose(out, [[-1.0, -0.5], [0.0, 0.5]])
    assert out.dtype == np.float32


def test_normalize_unsigned_keeps_zero_at_zero_and_clips_at_percentile():
    m = np.concatenate([np.linspace(0, 1, 999), [100.0]])  # one outlier
    out = viz.normalize(m, percentile=99.0)
    assert out.min() == 0.0
    assert out[0] == 0.0
    assert out[-1] == 1.0  # the outlier saturates
    # the 99th percentile of 1000 values, interpolated linearly between ranks 989 and 990:
    # sorted[989] + 0.01 * (sorted[990] - sorted[989]) = 989.01 / 998
    scale = 989.01 / 998
    np.testing.assert_allclose(out, np.clip(m / scale, 0, 1), rtol=1e-6, atol=0)
    assert out[-2] == 1.0  # the rest uses the full scale: 1 / scale > 1 saturates too
    assert out[500] == pytest.approx(500 / 998 / scale, rel=1e-6)
    np.testing.assert_allclose(viz.normalize(m, percentile=None), m / 100, rtol=1e-6)


def test_normalize_exact_values_on_a_hand_made_map():
    ramp = np.array([[0.0, 1.0, 2.0], [3.0, 4.0, 8.0]])
    # unsigned: divided by the percentile of the map (linear interpolation between ranks)
    np.testing.assert_allclose(
        viz.normalize(ramp, percentile=50), [[0, 1 / 2.5, 2 / 2.5], [1, 1, 1]], rtol=1e-6
    )
    np.testing.assert_allclose(viz.normalize(ramp, percentile=None), ramp / 8, rtol=1e-6)
    # 80th percentile of [0, 1, 2, 3, 4, 8]: rank 0.8 * 5 = 4, the value 4
    np.testing.assert_allclose(
        viz.normalize(ramp, percentile=80), np.clip(ramp / 4, 0, 1), rtol=1e-6
    )
    # signed: divided by the percentile of |map|, symmetric about zero, clipped to [-1, 1]
    signed = np.array([[-4.0, -1.0, 0.0], [2.0, 3.0, 0.5]])
    # |map| sorted: [0, 0.5, 1, 2, 3, 4]; 50th percentile: rank 2.5, (1 + 2) / 2 = 1.5
    np.testing.assert_allclose(
        viz.normalize(signed, percentile=50),
        [[-1.0, -1 / 1.5, 0.0], [1.0, 1.0, 0.5 / 1.5]],
        rtol=1e-6,
    )
    np.testing.assert_allclose(viz.normalize(signed, percentile=None), signed / 4, rtol=1e-6)
    # forced unsigned: negatives clip to 0, scale from the non-negative part (max 3)
    np.testing.assert_allclose(
        viz.normalize(signed, signed=False, percentile=100),
        [[0.0, 0.0, 0.0], [2 / 3, 1.0, 0.5 / 3]],
        rtol=1e-6,
    )


def test_normalize_forced_unsigned_none_is_the_100th_percentile():
    signed = np.array([[-4.0, -1.0, 0.0], [2.0, 3.0, 0.5]])
    np.testing.assert_allclose(
        viz.normalize(signed, signed=False, percentile=None),
        viz.normalize(signed, signed=False, percentile=100),
        rtol=1e-6,
    )


def test_normalize_auto_sign_and_forced_unsigned():
    m = np.array([-1.0, 0.5, 1.0])
    assert viz.normalize(m, percentile=None).min() == -1.0
    np.testing.assert_allclose(viz.normalize(m, signed=False, percentile=None), [0, 0.5, 1])
    tiny_negative = np.array([-1e-9, 0.5, 1.0])  # rounding noise is not a sign
    assert viz.normalize(tiny_negative, percentile=None).min() >= 0


def test_normalize_zero_map_and_bad_percentile():
    assert not viz.normalize(np.zeros((3, 3))).any()
    with pytest.raises(ValueError, match="percentile"):
        viz.normalize(np.ones(3), percentile=0)


# -- heatmap, overlay ------------------------------------------------------------------------


def test_signed_heatmap_is_diverging_centred_at_zero():
    m = torch.tensor([[-1.0, 0.0, 1.0]])
    pixels = np.asarray(viz.heatmap(m, percentile=None)).astype(int)
    negative, zero, positive = pixels[0]
    assert negative[2] > negative[0]  # blue
    assert positive[0] > positive[2]  # red
    assert zero.min() > 230  # white at zero
    assert abs(int(zero[0]) - int(zero[2])) < 12


def test_unsigned_heatmap_uses_sequential_map_and_respects_cmap():
    m = torch.tensor([[0.0, 1.0]])
    gray = np.asarray(viz.heatmap(m, cmap="gray", percentile=None))
    assert tuple(gray[0, 0]) == (0, 0, 0)
    assert tuple(gray[0, 1]) == (255, 255, 255)
    jet = np.asarray(viz.heatmap(m, percentile=None))
    assert jet[0, 0, 2] > jet[0, 0, 0]  # jet starts blue
    with pytest.raises(ValueError, match="colormap"):
        viz.heatmap(m, cmap="no-such-map")


def test_overlay_blends_and_resizes_the_map():
    image = Image.new("RGB", (20, 10), (10, 200, 30))
    attribution = _attribution(torch.rand(1, 3, 5, 5))
    plain = viz.overlay(image, attribution, alpha=0.0)
    assert plain.size == (20, 10)
    assert plain.mode == "RGB"
    assert np.array_equal(np.asarray(plain), np.asarray(image))
    full = viz.overlay(image, attribution, alpha=1.0, cmap="gray")
    heat = viz.heatmap(attribution, cmap="gray").resize((20, 10), Image.Resampling.BILINEAR)
    assert np.abs(np.asarray(full).astype(int) - np.asarray(heat)).max() <= 1
    half = viz.overlay(image, attribution, alpha=0.5)
    assert isinstance(half, Image.Image)
    assert hasattr(half, "save")
    with pytest.raises(ValueError, match="alpha"):
        viz.overlay(image, attribution, alpha=1.5)


# matplotlib's "jet" (matplotlib._cm._jet_data): (x, value) breakpoints of each channel
_JET = {
    "red": [(0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)],
    "green": [(0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)],
    "blue": [(0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)],
}


def _lut_index(u: float) -> int:
    """A matplotlib colormap has 256 entries: ``u`` picks entry ``floor(256 u)`` (255 at 1)."""
    return min(int(u * 256), 255)


def _jet_by_hand(u: float) -> np.ndarray:
    x = _lut_index(u) / 255  # the entry's position in [0, 1]
    rgb = [np.interp(x, *zip(*_JET[c], strict=True)) for c in ("red", "green", "blue")]
    return np.round(np.array(rgb) * 255)


def test_overlay_pixels_by_hand():
    """``(1 - alpha) image + alpha heatmap``; the heatmap is jet of map / p99 for maps >= 0."""
    values = torch.tensor([[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 8.0]])
    rows, cols = np.mgrid[0:2, 0:4]
    image = np.stack([10 + 60 * cols, 200 - 90 * rows, 30 * cols + 40 * rows], -1).astype(np.uint8)
    out = np.asarray(viz.overlay(image, values[None, None], alpha=0.25)).astype(float)
    p99 = 6 + (0.99 * 7 - 6) * (8 - 6)  # rank 0.99 * 7 = 6.93 between 6 and 8: 7.86
    for i, j in [(0, 0), (0, 1), (0, 3), (1, 0), (1, 2), (1, 3)]:
        unit = min(float(values[i, j]) / p99, 1.0)
        expected = 0.75 * image[i, j] + 0.25 * _jet_by_hand(unit)
        np.testing.assert_allclose(out[i, j], expected, atol=0.51, err_msg=f"pixel {(i, j)}")
    assert tuple(_jet_by_hand(0.0)) == (0, 0, 128)  # jet starts dark blue
    assert tuple(_jet_by_hand(1.0)) == (128, 0, 0)  # and ends dark red


def test_signed_overlay_is_centred_and_resized_bilinearly():
    """A signed map in gray: -1 -> 0, 0 -> 128, 1 -> 255 before blending; upsampled from 1x2
    to 1x4 with pixel centres aligned (source x = (i + 0.5) / 2 - 0.5, edges clamped)."""
    image = np.full((1, 5, 3), 100, dtype=np.uint8)
    signed = torch.tensor([[-2.0, -1.0, 0.0, 1.0, 2.0]])
    out = np.asarray(viz.overlay(image, signed, cmap="gray", alpha=0.5, percentile=None))
    gray = np.array([0, 64, 128, 192, 255])  # entry floor(256 u), u = (v / 2 + 1) / 2
    np.testing.assert_allclose(out[0, :, 0], 50 + gray / 2, atol=0.51)
    assert np.array_equal(out[..., 0], out[..., 2])
    image = np.full((1, 4, 3), 40, dtype=np.uint8)
    small = torch.tensor([[0.0, 1.0]])
    out = np.asarray(viz.overlay(image, small, cmap="gray", alpha=0.5, percentile=None))
    heat = np.array([0.0, 0.25 * 255, 0.75 * 255, 255.0])
    np.testing.assert_allclose(out[0, :, 1], 20 + heat / 2, atol=1.01)


def test_overlay_accepts_arrays_and_tensors_in_unit_range():
    attribution = torch.rand(1, 1, 4, 4)
    array = np.random.default_rng(0).random((4, 4, 3))
    assert viz.overlay(array, attribution).size == (4, 4)
    assert viz.overlay(torch.rand(3, 4, 4), attribution).size == (4, 4)
    with pytest.raises(ValueError, match="to_image"):
        viz.overlay(torch.randn(3, 4, 4) * 3, attribution)


def test_saliency_map_reduces_as_the_method_and_picks_targets():
    values = torch.randn(2, 3, 4, 4)
    a = _attribution(values, reduction="sum")
    np.testing.assert_allclose(viz.saliency_map(a, index=1), values[1].sum(0).numpy(), rtol=1e-6)
    cams = _attribution(torch.rand(1, 2, 4, 4), method="grad_cam", reduction="none")
    np.testing.assert_allclose(viz.saliency_map(cams, target=1), cams.values[0, 1].numpy())
    with pytest.raises(ValueError, match="reduction"):
        viz.saliency_map(torch.rand(3, 4, 4))
    negative = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0)) - 2
    reduced = viz.saliency_map(negative, reduction="abs_max")
    np.testing.assert_array_equal(reduced, negative.abs().amax(0).numpy())
    assert reduced.min() > 1.0  # every |value| is in (1, 2]
    by_hand = np.array([[[1.0, -5.0]], [[-3.0, 2.0]]])  # (C=2, H=1, W=2)
    np.testing.assert_array_equal(viz.saliency_map(by_hand, reduction="abs_max"), [[3.0, 5.0]])
    np.testing.assert_array_equal(viz.saliency_map(by_hand, reduction="sum"), [[-2.0, -3.0]])
    np.testing.assert_array_equal(viz.saliency_map(by_hand, reduction="abs_sum"), [[4.0, 7.0]])


# -- the guided rendering --------------------------------------------------------------------


def test_guided_image_standardizes_to_gray_with_fixed_std():
    g = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 1e-4 + 5e-5
    pixels = np.asarray(viz.guided_image(g)).astype(np.float64) / 255
    assert pixels.mean() == pytest.approx(0.5, abs=0.01)
    assert pixels.std() == pytest.approx(0.1, abs=0.01)
    # the same map at any scale gives the same picture
    assert np.array_equal(np.asarray(viz.guided_image(g * 1000)), np.asarray(viz.guided_image(g)))
    with pytest.raises(ValueError, match="3-channel"):
        viz.guided_image(torch.rand(1, 1, 4, 4))


# -- styles, grid ----------------------------------------------------------------------------


def test_maps_that_are_not_finite_are_drawn_with_a_warning():
    """NaN is drawn as zero, +inf and -inf at the ends of the scale (an infinite gradient is
    the largest value of its map), and the drawing says so."""
    m = np.linspace(-1, 2, 16, dtype=np.float32).reshape(4, 4)
    m[0, 0], m[3, 3], m[1, 1] = np.inf, -np.inf, np.nan
    with pytest.warns(RuntimeWarning, match="1 NaN and 2 infinite value"):
        norm = viz.normalize(m, percentile=None)
    clean = m.copy()
    clean[0, 0] = clean[3, 3] = clean[1, 1] = 0
    expected = clean / np.abs(clean).max()  # scaled by the finite values only
    expected[0, 0], expected[3, 3] = 1, -1
    np.testing.assert_allclose(norm, expected, atol=1e-7)
    with pytest.warns(RuntimeWarning, match="16 NaN"):
        assert not viz.normalize(np.full((4, 4), np.nan)).any()
    with pytest.warns(RuntimeWarning, match="4 infinite"):
        top = np.array(viz.heatmap(np.where(np.eye(4) > 0, np.inf, 1.0), cmap="gray"))
    assert (top[0, 0] == 255).all()  # the infinite value at the top, not black


def test_guided_image_of_a_map_with_a_nan_is_the_map_with_a_zero():
    g = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    holed = g.clone()
    holed[0, 1, 2, 3] = float("nan")
    g[0, 1, 2, 3] = 0
    with pytest.warns(RuntimeWarning, match="1 NaN"):
        picture = np.array(viz.guided_image(holed))
    assert np.array_equal(picture, np.array(viz.guided_image(g)))
    with pytest.raises(ValueError, match="index 5 out of range for a batch of 1"):
        viz.guided_image(g, index=5)


def test_render_picks_the_papers_style(vgg, images):
    x = images[:1]
    image = Image.new("RGB", (16, 16), "white")
    gb = salience.guided_backprop(vgg, x)
    cam = salience.grad_cam(vgg, x)
    ig = salience.integrated_gradients(vgg, x, steps=4)
    grad = salience.gradient(vgg, x)
    assert viz.default_style(gb) == "rgb"
    assert viz.default_style(cam) == "overlay"
    assert viz.default_style(ig) == "heatmap"
    assert np.array_equal(np.asarray(viz.render(gb)), np.asarray(viz.guided_image(gb)))
    assert np.array_equal(np.asarray(viz.render(cam, image)), np.asarray(viz.overlay(image, cam)))
    gray = np.asarray(viz.render(grad))
    assert np.array_equal(gray[..., 0], gray[..., 2])  # gradient magnitudes in gray
    for picture in (viz.render(ig), viz.render(cam), viz.render(grad, image, style="overlay")):
        assert picture.mode == "RGB"
        assert picture.size == (16, 16)


def test_grid_lays_out_titled_panels():
    panels = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue")]
    one_row = viz.grid(panels, ["a", "b", "c"], title="three", panel_size=1.0, dpi=50)
    two_rows = viz.grid(panels, ["a", "b", "c"], ncols=2, panel_size=1.0, dpi=50)
    assert one_row.mode == "RGB"
    assert one_row.width > two_rows.width
    assert two_rows.height > one_row.height
    assert viz.grid([np.zeros((8, 8))]).size[0] > 0  # grayscale arrays work
    with pytest.raises(ValueError, match="titles"):
        viz.grid(panels, ["a"])
    with pytest.raises(ValueError, match="at least one"):
        viz.grid([])


# -- Jupyter ---------------------------------------------------------------------------------


def test_grid_titles_are_shown_as_written():
    """File names may hold ``$``: matplotlib would read ``$x^$`` as broken mathematics."""
    panel = np.zeros((4, 4, 3), dtype=np.uint8)
    picture = viz.grid([panel, panel], ["price_$5_x^$.png", "$a$"], title="cost $5 and $10")
    assert picture.size[0] > 0


def test_attribution_displays_itself_in_jupyter(vgg, images):
    single = salience.grad_cam(vgg, images[:1])
    png = single._repr_png_()
    assert png is not None
    assert png.startswith(b"\x89PNG")
    assert min(Image.open(io.BytesIO(png)).size) >= 160  # tiny maps are enlarged
    html = single._repr_html_()
    assert html is not None
    assert 'src="data:image/png;base64,' in html
    assert "grad_cam" in html
    batch = salience.integrated_gradients(vgg, images, steps=4)
    assert Image.open(io.BytesIO(batch._repr_png_())).width > 160  # a grid of 3
    several = salience.grad_cam(vgg, images[:2], torch.tensor([[0, 1], [2, 3]]))
    assert several._repr_png_() is not None


def test_repr_never_raises():
    broken = _attribution(torch.rand(5))  # no spatial axes
    assert broken._repr_png_() is None
    assert broken._repr_html_() is None


def test_import_salience_does_not_import_matplotlib():
    code = (
        "import sys, salience; print('matplotlib' in sys.modules); "
        "print(salience.viz.overlay.__name__, 'matplotlib' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "overlay", "False"]  # viz is loaded lazily
