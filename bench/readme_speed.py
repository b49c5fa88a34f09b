"""Write the README's speed tables from bench/RESULTS.md, or check that they are current.

    python bench/readme_speed.py            # after python bench/suite.py: rewrite the README blocks
    python bench/readme_speed.py --check    # exit 1 if the README differs from RESULTS.md (tests)

The README's figures are never typed by hand: its blocks ``<!-- speed-suite:begin -->`` (the
CPU) and ``<!-- speed-cuda:begin -->`` (a GPU) are rendered from the blocks that
``bench/suite.py`` writes into ``bench/RESULTS.md`` (:data:`TABLES`), for the rows chosen there.
A chosen row that RESULTS.md does not have is an error, so the files cannot drift apart.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import read_block, table_rows, write_block

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "RESULTS.md")
README = os.path.join(os.path.dirname(HERE), "README.md")

BLOCKS = ("suite", "suite-batch8", "suite-batch32", "suite-occlusion")
"""The blocks of RESULTS.md the table is taken from (bench/suite.py --block)."""

# (model, batch, method, what the README calls it)
SELECTION: list[tuple[str, int, str, str]] = [
    ("lite0", 1, "gradient", "gradient, Lite0"),
    ("lite0", 1, "guided_backprop", "guided backprop, Lite0"),
    ("lite0", 1, "integrated_gradients", "Integrated Gradients 50 steps, Lite0"),
    ("lite0", 8, "integrated_gradients", "Integrated Gradients 50 steps, Lite0, batch 8"),
    ("lite0", 1, "smoothgrad", "SmoothGrad 32 samples, Lite0"),
    ("lite0", 8, "smoothgrad", "SmoothGrad 32 samples, Lite0, batch 8"),
    ("lite0", 1, "grad_cam", "Grad-CAM, Lite0"),
    ("lite0", 8, "grad_cam", "Grad-CAM, Lite0, batch 8"),
    ("lite0", 32, "gradient", "gradient, Lite0, batch 32"),
    ("vgg", 1, "deeplift", "DeepLIFT, VGG-style"),
    ("lite0", 1, "deeplift", "DeepLIFT, Lite0"),
    ("vgg", 32, "deeplift", "DeepLIFT, VGG-style, batch 32"),
    ("lite0", 1, "lrp", "LRP ε⁺ (default composite), Lite0"),
    ("vgg", 1, "lrp", "LRP ε⁺, VGG-style"),
    ("vgg", 1, "occlusion", "occlusion 16/8 (729 windows), VGG-style"),
    ("lite0", 1, "occlusion", "occlusion 16/8, Lite0"),
]

CUDA_BLOCKS = ("suite-cuda",)
"""The GPU run (bench/gpu_session.sh: bench/suite.py --device cuda --block suite-cuda)."""

CUDA_SELECTION: list[tuple[str, int, str, str]] = [
    ("lite0", 1, "gradient", "gradient, Lite0"),
    ("lite0", 1, "guided_backprop", "guided backprop, Lite0"),
    ("lite0", 1, "grad_cam", "Grad-CAM, Lite0"),
    ("lite0", 1, "integrated_gradients", "Integrated Gradients 50 steps, Lite0"),
    ("lite0", 1, "smoothgrad", "SmoothGrad 32 samples, Lite0"),
    ("lite0", 1, "deeplift", "DeepLIFT, Lite0"),
    ("lite0", 1, "occlusion", "occlusion 16/8, Lite0"),
    ("vgg", 1, "gradient", "gradient, VGG-style"),
    ("vgg", 1, "deeplift", "DeepLIFT, VGG-style"),
    ("resnet", 1, "gradient", "gradient, ResNet-style"),
    ("lite0", 32, "gradient", "gradient, Lite0, batch 32"),
    ("lite0", 32, "grad_cam", "Grad-CAM, Lite0, batch 32"),
    ("lite0", 32, "integrated_gradients", "Integrated Gradients 50 steps, Lite0, batch 32"),
    ("lite0", 32, "smoothgrad", "SmoothGrad 32 samples, Lite0, batch 32"),
    ("vgg", 32, "integrated_gradients", "Integrated Gradients 50 steps, VGG-style, batch 32"),
    ("vgg", 32, "deeplift", "DeepLIFT, VGG-style, batch 32"),
    ("lite0", 8, "occlusion", "occlusion 16/8, Lite0, batch 8"),
]

TABLES: dict[str, tuple[tuple[str, ...], list[tuple[str, int, str, str]]]] = {
    "speed-suite": (BLOCKS, SELECTION),
    "speed-cuda": (CUDA_BLOCKS, CUDA_SELECTION),
}
"""README block: (the RESULTS.md blocks it is taken from, its rows)."""


def render(results: str = RESULTS, table: str = "speed-suite") -> str:
    """The README block ``table``: the command and machine of the runs, then the chosen rows.

    A table of multi-pass methods' rows (the GPU's) also gives salience's time over the limit
    (passes x one forward + backward of the same batch).
    """
    blocks, selection = TABLES[table]
    rows: dict[tuple[str, str, str], dict[str, str]] = {}
    runs: list[str] = []
    machine = ""
    for name in blocks:
        block = read_block(results, name)
        rows.update({(r["model"], r["batch"], r["method"]): r for r in table_rows(block)})
        for line in block.splitlines():
            if line.startswith("`python bench/"):
                command, machine = line.split(" on ", 1)
                runs.append(f"- {command}")
    limits = table == "speed-cuda"
    lines = [
        f"From `bench/RESULTS.md`, measured on {machine}",
        "",
        *runs,
        "",
        "| work (batch 1 unless said) | salience | Captum | Captum / salience | agreement |"
        + (" salience / limit |" if limits else ""),
        "|---|---:|---:|---:|---:|" + ("---:|" if limits else ""),
    ]
    for model, batch, method, label in selection:
        row = rows.get((model, str(batch), method))
        if row is None:
            raise SystemExit(
                f"bench/RESULTS.md has no row for {model}, batch {batch}, {method}: run "
                f"python bench/suite.py --models {model} --batch {batch} --methods {method}, "
                "or drop it from SELECTION"
            )
        note = row.get("note", "")
        theirs = row["peer time"] or ("raises" if note.startswith("Captum raises") else "—")
        ratio = f"**{row['peer / salience']}**" if row["peer / salience"] else "—"
        line = f"| {label} | {row['salience']} | {theirs} | {ratio} | {row['agreement'] or '—'} |"
        if limits:
            line += f" {row['salience / limit'] or '—'} |"
        lines.append(line)
    return "\n".join(lines).strip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 if stale")
    parser.add_argument("--results", default=RESULTS)
    parser.add_argument("--readme", default=README)
    args = parser.parse_args(argv)
    texts = {table: render(args.results, table) for table in TABLES}
    if args.check:
        stale = [table for table, text in texts.items() if read_block(args.readme, table) != text]
        if stale:
            print(
                f"README.md's speed tables ({', '.join(stale)}) differ from bench/RESULTS.md: "
                "run python bench/readme_speed.py",
                file=sys.stderr,
            )
            return 1
        return 0
    for table, text in texts.items():
        write_block(args.readme, table, text)
        print(f"wrote the {table} block of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
