"""Regenerate the pictures in docs/gallery/ with the ``salience`` command line.

Run from the repository root: ``python docs/make_gallery.py`` (about a minute on a laptop CPU).
Each picture is made by the CLI with its defaults (the bundled pretrained EfficientNet-Lite0),
then stored as a 256-color PNG (dithered) when that is smaller, to keep the repository small.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image

from salience import cli

GALLERY = Path(__file__).resolve().parent / "gallery"
MAX_BYTES = 250_000

# (CLI arguments, file the CLI writes, name in the gallery)
PICTURES = [
    (
        ["compare", "sample:chelsea", "--panel-size", "1.9"],
        "chelsea.compare.285-Egyptian_cat.png",
        "compare_chelsea.png",
    ),
    (
        ["explain", "sample:chelsea", "--method", "grad_cam"],
        "chelsea.grad_cam.285-Egyptian_cat.png",
        "explain_chelsea_grad_cam.png",
    ),
    (["visualize-class", "goldfish"], "class_model.1-goldfish.png", "class_model_goldfish.png"),
    (
        [
            "compare",
            "sample:chelsea",
            "--panel-size",
            "1.9",
            "-m",
            "grad_cam,integrated_gradients,lrp,deeplift,occlusion,rise",
        ],
        "chelsea.compare.285-Egyptian_cat.png",
        "compare_chelsea_relevance_perturbation.png",
    ),
]


def _store(source: Path, target: Path) -> int:
    """Save ``source`` as a palette PNG if that is smaller; return the size in bytes."""
    shutil.copyfile(source, target)
    image = Image.open(source).convert("RGB")
    colors = image.quantize(256, method=Image.Quantize.FASTOCTREE)
    palette = image.quantize(palette=colors, dither=Image.Dither.FLOYDSTEINBERG)
    candidate = target.with_suffix(".tmp.png")
    palette.save(candidate, optimize=True)
    if candidate.stat().st_size < target.stat().st_size:
        candidate.replace(target)
    else:
        candidate.unlink()
    return target.stat().st_size


def main() -> int:
    """Make every picture; fail if one is missing or too large."""
    GALLERY.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for argv, produced, name in PICTURES:
            code = cli.main([*argv, "--out", tmp])
            if code != cli.EXIT_OK:
                print(f"salience {' '.join(argv)} failed with status {code}", file=sys.stderr)
                return code
            size = _store(Path(tmp) / produced, GALLERY / name)
            print(f"docs/gallery/{name}: {size / 1000:.0f} kB")
            if size > MAX_BYTES:
                print(f"{name} is over {MAX_BYTES / 1000:.0f} kB", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
