"""Draw docs/reconstruction_lite0.png: DeconvNet reconstructions in EfficientNet-Lite0.

Run from the repository root: ``python docs/make_reconstruction_figure.py`` (seconds on a
laptop CPU). For each bundled photo and four depths of the pretrained EfficientNet-Lite0, the
strongest activation of the layer is projected back to pixels
(:func:`salience.features.reconstruct`, Zeiler & Fergus 2013) and shown beside the image patch
it sees, its receptive field (drawn on the photo in the same colour).
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from salience import models
from salience.features import reconstruct
from salience.features.top import _projection_pixels, with_heading
from salience.viz import grid

OUT = Path(__file__).resolve().parent / "reconstruction_lite0.png"
# (layer, stride): block outputs; the last one deeper, with larger receptive fields
LAYERS = [("_blocks.1", 4), ("_blocks.3", 8), ("_blocks.5", 16), ("_blocks.9", 16)]
COLOURS = ["#e41a1c", "#377eb8", "#4daf4a", "#ff7f00"]


def main() -> int:
    """Draw the figure and write it to ``OUT``."""
    start = time.monotonic()
    model = models.load("efficientnet_lite0")
    names = ["chelsea", "coffee"]
    inputs = torch.cat([model.preprocess(models.sample_image(n)) for n in names])
    results = [reconstruct(model, inputs, layer) for layer, _ in LAYERS]
    panels: list[np.ndarray] = []
    titles: list[str] = []
    for n, name in enumerate(names):
        photo = Image.fromarray(model.to_image(inputs[n]))
        pixels = np.asarray(photo)
        framed = photo.copy()
        draw = ImageDraw.Draw(framed)
        row: list[tuple[np.ndarray, str]] = []
        for (layer, what), result, colour in zip(LAYERS, results, COLOURS, strict=True):
            top, left, bottom, right = (int(v) for v in result.box[n])
            draw.rectangle((left, top, right - 1, bottom - 1), outline=colour, width=3)
            c = int(result.channel[n])
            row.append((pixels[top:bottom, left:right], f"{layer} (/{what}), ch {c}"))
            row.append(
                (
                    _projection_pixels(result.projection[n, :, top:bottom, left:right]),
                    f"reconstruction, {bottom - top}×{right - left} px",
                )
            )
        panels.append(np.asarray(framed))
        titles.append(f"{name}: receptive fields")
        for picture, text in row:
            panels.append(np.ascontiguousarray(picture))
            titles.append(text)
    figure = with_heading(
        grid(panels, titles, ncols=1 + 2 * len(LAYERS), panel_size=1.7, fontsize=7),
        "EfficientNet-Lite0: the strongest activation of each layer, projected back to pixels "
        "(DeconvNet, Zeiler & Fergus 2013)",
    )
    buffer, palette = io.BytesIO(), io.BytesIO()
    figure.save(buffer, format="PNG", optimize=True)
    figure.quantize(256, dither=Image.Dither.FLOYDSTEINBERG).save(
        palette, format="PNG", optimize=True
    )
    data = min(buffer.getvalue(), palette.getvalue(), key=len)
    OUT.write_bytes(data)
    print(f"wrote {OUT} ({len(data) // 1000} kB) in {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
