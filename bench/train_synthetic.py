"""Train the synthetic benchmark's CNN and write the weights shipped in the package.

    python bench/train_synthetic.py                      # writes src/salience/data/synthetic_cnn.pt
    python bench/train_synthetic.py --out /tmp/cnn.pt --steps 300

Data: fresh images every step from seed 1 of :func:`salience.metrics.synthetic.generate`
(step ``k`` uses samples ``k * batch .. (k + 1) * batch - 1``), so no image is seen twice;
held-out accuracy is measured on seed 0. Adam with a cosine learning-rate schedule, cross-
entropy, float32, CPU, ``--threads`` threads (default 2). Deterministic for a given torch build
and thread count. Training runs with a batch normalization after every convolution (it trains in
a few hundred steps, where the plain network stalls at chance); at the end each normalization,
in eval mode an affine map, is folded into its convolution, ``w' = w * g / sqrt(v + eps)``,
``b' = (b - m) * g / sqrt(v + eps) + beta``, so the shipped network is plain convolutions and
ReLUs and computes the same function. The weights are saved as a float16 state dict (about
100 KB); the held-out accuracy is measured again with the float16-rounded weights before saving.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from salience._io import atomic_write
from salience.metrics.synthetic import TRAIN_SEED, generate
from salience.models.synthetic import SyntheticCNN

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "salience" / "data" / "synthetic_cnn.pt"


def accuracy(model: torch.nn.Module, n: int, seed: int) -> float:
    data = generate(n, seed=seed)
    with torch.no_grad():
        predicted = torch.cat([model(x).argmax(1) for x in data.images.split(250)])
    return float((predicted == data.labels).float().mean())


def with_batch_norm(model: SyntheticCNN) -> SyntheticCNN:
    """Insert a BatchNorm2d after every convolution of ``model.features`` (for training)."""
    layers: list[torch.nn.Module] = []
    for layer in model.features:
        layers.append(layer)
        if isinstance(layer, torch.nn.Conv2d):
            layers.append(torch.nn.BatchNorm2d(layer.out_channels))
    model.features = torch.nn.Sequential(*layers)
    return model


def fold_batch_norm(trained: SyntheticCNN) -> SyntheticCNN:
    """Return a plain :class:`SyntheticCNN` computing what ``trained`` (eval mode) computes."""
    plain = SyntheticCNN()
    convs = [m for m in plain.features if isinstance(m, torch.nn.Conv2d)]
    layers = list(trained.features)
    pairs = [
        (a, b)
        for a, b in itertools.pairwise(layers)
        if isinstance(a, torch.nn.Conv2d) and isinstance(b, torch.nn.BatchNorm2d)
    ]
    assert len(pairs) == len(convs)
    with torch.no_grad():
        for target, (conv, norm) in zip(convs, pairs, strict=True):
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            target.weight.copy_(conv.weight * scale[:, None, None, None])
            target.bias.copy_((conv.bias - norm.running_mean) * scale + norm.bias)
        plain.fc.load_state_dict(trained.fc.state_dict())
    return plain.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--init-seed", type=int, default=0)
    parser.add_argument("--held-out", type=int, default=1000, help="held-out images (seed 0)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.init_seed)
    model = with_batch_norm(SyntheticCNN())
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: 0.5 * (1 + math.cos(math.pi * k / args.steps))
    )
    start = time.monotonic()
    running = 0.0
    for step in range(args.steps):
        batch = generate(args.batch, seed=TRAIN_SEED, start=step * args.batch)
        loss = F.cross_entropy(model(batch.images), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        value = float(loss.detach())
        running = 0.98 * running + 0.02 * value if step else value
        if (step + 1) % 50 == 0:
            print(
                f"step {step + 1}/{args.steps} loss {running:.4f} {time.monotonic() - start:.0f}s",
                flush=True,
            )
    model.eval()
    folded = fold_batch_norm(model)
    x = generate(64, seed=0).images
    with torch.no_grad():
        gap = float((folded(x) - model(x)).abs().max())
    print(f"folding the batch norms changes the logits by at most {gap:.2e}")
    state = {k: v.detach().half() for k, v in folded.state_dict().items()}
    rounded = SyntheticCNN()
    rounded.load_state_dict({k: v.float() for k, v in state.items()})
    rounded.eval()
    acc = accuracy(rounded, args.held_out, seed=0)
    print(
        f"trained {args.steps} steps x {args.batch} images in {time.monotonic() - start:.0f}s; "
        f"held-out accuracy (seed 0, {args.held_out} images, float16 weights) {acc:.4f}"
    )
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(args.out, buffer.getvalue())
    print(f"wrote {args.out} ({len(buffer.getvalue()) / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
