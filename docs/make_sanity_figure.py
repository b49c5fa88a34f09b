"""Draw docs/sanity_lite0.png: the sanity check of Adebayo et al. (2018) on EfficientNet-Lite0.

Cascading randomization from the top of the pretrained EfficientNet-Lite0, layer block by
layer block, on the bundled cat photo: gradient and Grad-CAM maps lose their similarity to
the trained model's map, guided backpropagation keeps it while the top half of the network is
random. Top: similarity against the layers randomized (one panel per measure, one line per
method). Bottom: the normalized absolute maps at five of the steps.

Run from the repository root (about 30 s on a CPU)::

    python docs/make_sanity_figure.py

It prints the Spearman (abs) table it draws.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch
from matplotlib.figure import Figure

from salience import models
from salience.metrics import parameter_randomization, plot_sanity_checks

METHODS = ("gradient", "grad_cam", "guided_backprop")
SHOWN = ("_fc", "_blocks.13", "_blocks.8", "_blocks.3", "_conv_stem")


def main() -> None:
    """Compute the three checks, print their table and write the figure."""
    start = time.perf_counter()
    torch.manual_seed(0)
    model = models.load("efficientnet_lite0")
    x = model.preprocess(models.sample_image("chelsea"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random model's Grad-CAM may be zero: NaN, warned
        checks = {m: parameter_randomization(model, x, m, seed=0) for m in METHODS}

    layers = checks[METHODS[0]].layers
    print("Spearman rank correlation of |map| with the trained model's map (cat, seed 0)")
    print(f"{'randomized down to':20s}" + "".join(f"{m:>17s}" for m in METHODS))
    for k, layer in enumerate(layers):
        row = "".join(f"{float(checks[m].mean()[k]):17.2f}" for m in METHODS)
        print(f"{layer:20s}{row}")
    for check in checks.values():
        print(check.verdict())

    fig = Figure(figsize=(14, 10.5), dpi=72)
    grid = fig.add_gridspec(2, 1, height_ratios=[1.1, 1.6], hspace=0.35)
    top = grid[0].subgridspec(1, 4, wspace=0.3)
    axes = [fig.add_subplot(top[0, i]) for i in range(4)]
    plot_sanity_checks(checks, ("spearman_abs", "spearman", "ssim", "hog"), axes=axes)
    for ax in axes:
        ax.set_xlabel("")
        for label in ax.get_xticklabels():
            label.set_fontsize(5.5)
    columns = ["original", *SHOWN]
    bottom = grid[1].subgridspec(len(METHODS), len(columns), wspace=0.05, hspace=0.12)
    image = model.to_image(x[0])
    for r, method in enumerate(METHODS):
        check = checks[method]
        assert check.maps is not None
        for c, column in enumerate(columns):
            ax = fig.add_subplot(bottom[r, c])
            if column == "original":
                shown = check.original[0]
            else:
                shown = check.maps[layers.index(column), 0]
            ax.imshow(image, alpha=0.35)
            ax.imshow(shown.numpy(), cmap="inferno", alpha=0.75, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(
                    "trained" if column == "original" else f"random down to\n{column}",
                    fontsize=8,
                )
            if c == 0:
                ax.set_ylabel(method, fontsize=9)
    fig.suptitle(
        "Sanity check (Adebayo et al. 2018): cascading randomization of EfficientNet-Lite0, "
        "from the top",
        fontsize=12,
    )
    out = Path(__file__).resolve().parent / "sanity_lite0.png"
    fig.savefig(out, bbox_inches="tight")
    print(f"wrote {out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
