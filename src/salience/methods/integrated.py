"""Integrated Gradients (Sundararajan et al. 2017), with fixed or adaptive path quadrature."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import all_finite, check_choice, check_positive_int, warn
from .._chunks import BatchSize, Chunker, add_rows
from .._forward import Forward, ForwardArgs, model_scope
from ..attribution import Attribution
from ..registry import register
from ..targets import ResolvedTarget, Score, TargetLike, resolve_target
from .gradient import clean_rows_ride_along, score_gradient, score_gradient_with_clean

__all__ = ["integrated_gradients", "quadrature_nodes"]

Quadrature = Literal[
    "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre"
]
BaselineLike = Literal["zeros", "black", "blur", "uniform"] | float | Tensor
_QUADRATURES = (
    "riemann_left",
    "riemann_right",
    "riemann_middle",
    "riemann_trapezoid",
    "gausslegendre",
)


@functools.lru_cache(maxsize=32)
def _gauss_legendre(n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Gauss-Legendre nodes and weights on [0, 1] (computed once per ``n``: ~0.1 ms each)."""
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return tuple(((nodes + 1) / 2).tolist()), tuple((weights / 2).tolist())


def quadrature_nodes(quadrature: Quadrature, steps: int) -> tuple[Tensor, Tensor]:
    """Nodes ``alpha`` in [0, 1] and weights of a ``steps``-point rule for ``int_0^1 g``.

    Returns:
        ``(alphas, weights)``, float64 tensors of length ``steps``.
    """
    check_choice("quadrature", quadrature, _QUADRATURES)
    check_positive_int("steps", steps)
    n = steps
    if quadrature == "gausslegendre":
        nodes, gl_weights = _gauss_legendre(n)
        f64 = torch.float64
        return torch.tensor(nodes, dtype=f64), torch.tensor(gl_weights, dtype=f64)
    if quadrature == "riemann_trapezoid":
        if n < 2:
            raise ValueError("the trapezoid rule needs steps >= 2")
        alphas = torch.linspace(0, 1, n, dtype=torch.float64)
        weights = torch.full((n,), 1 / (n - 1), dtype=torch.float64)
        weights[[0, -1]] /= 2
        return alphas, weights
    offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[quadrature]
    alphas = (torch.arange(n, dtype=torch.float64) + offset) / n
    return alphas, torch.full((n,), 1 / n, dtype=torch.float64)


@register("integrated_gradients")
def integrated_gradients(
    model: nn.Module,
    inputs: Tensor,
    target: TargetLike = None,
    *,
    baseline: BaselineLike = "zeros",
    steps: int | None = None,
    quadrature: Quadrature | None = None,
    tolerance: float | None = None,
    max_steps: int = 1024,
    batch_size: BatchSize = "auto",
    score: Score = "logit",
    blur_sigma: float | None = None,
    seed: int = 0,
    forward_args: ForwardArgs = None,
    allow_tf32: bool = False,
) -> Attribution:
    r"""Integrated Gradients (Sundararajan et al. 2017): path integral of the gradient.

    .. math:: \mathrm{IG}_i(x) = (x_i - x'_i) \int_0^1
              \frac{\partial S_c(x' + \alpha (x - x'))}{\partial x_i}\, d\alpha

    Completeness says :math:`\sum_i \mathrm{IG}_i = S_c(x) - S_c(x')`. The gap,
    ``extras["delta"] = sum(values) - (S(x) - S(x'))`` per sample, is always reported, and
    ``extras["steps"]`` holds the number of gradient evaluations.

    With a fixed rule (``quadrature``, default Gauss-Legendre) and ``steps`` nodes, the gap is
    often far from zero on real networks: their gradients jump along the path. With
    ``tolerance=t`` the path is refined adaptively instead: the forward passes give ``S`` at
    every node, so each interval's trapezoid estimate is checked against
    ``S(alpha_{i+1}) - S(alpha_i)`` and only the intervals that are off are bisected, until
    ``|delta| <= t * |S(x) - S(x')|`` or ``max_steps`` nodes are used.

    Args:
        model: Any differentiable PyTorch model.
        inputs: ``(N, C, H, W)`` preprocessed images.
        target: What to explain; see :mod:`salience.targets`.
        baseline: ``"zeros"``: zero in the space of ``inputs``. For normalised inputs that is
            the mean colour, mid-grey for a model normalised with mean = std = 0.5 such as
            EfficientNet-Lite0, not the paper's black image; ``"black"``: the black image
            ``(0 - mean) / std``, for models that carry their normalisation as ``mean`` and
            ``std`` attributes (``salience.models`` do); ``"blur"`` (a Gaussian blur of the
            input, Sturmfels et al. 2020); ``"uniform"`` (uniform noise over each input's
            range, seeded: one noise pattern for the batch, scaled to each sample's range, so a
            sample's baseline does not depend on the batch it is in); a number; or a tensor
            broadcastable to ``inputs``.
        steps: Number of nodes of the fixed rule (default 50), or of initial intervals with
            ``tolerance`` (default 16).
        quadrature: ``"riemann_left"``, ``"riemann_right"``, ``"riemann_middle"``,
            ``"riemann_trapezoid"`` or ``"gausslegendre"`` (default). Not with ``tolerance``.
        tolerance: Target completeness gap relative to ``|S(x) - S(x')|``; enables the adaptive
            path.
        max_steps: Cap on gradient evaluations per sample for the adaptive path. Node gradients
            are kept until the end, so memory grows with the nodes used.
        batch_size: Rows per forward pass, or ``"auto"``: from the device (the CPU: a few
            rows; CUDA: what fits in free memory, see :mod:`salience._chunks`).
        score: ``"logit"``, ``"probability"`` or ``"log_probability"``.
        blur_sigma: Standard deviation in pixels of the ``"blur"`` baseline (default: 1/20 of
            the larger image side).
        seed: Seed of the ``"uniform"`` baseline.
        forward_args: Extra arguments for the model, expanded with each path point (see
            :func:`salience.gradient`).
        allow_tf32: Let CUDA use TF32 (faster, less exact); off by default.

    A baseline equal to an input gives an all-zero map for it (nothing to integrate), and a
    path that reaches ``max_steps`` before ``tolerance``: both warn.

    References:
        Sundararajan, Taly, Yan. Axiomatic Attribution for Deep Networks. ICML 2017,
        arXiv:1703.01365.
    """
    steps = check_positive_int(
        "steps", steps if steps is not None else (50 if tolerance is None else 16)
    )
    check_positive_int("max_steps", max_steps)
    if tolerance is not None:
        if quadrature is not None:
            raise ValueError(
                "tolerance= refines the path with the adaptive trapezoid rule; "
                "leave quadrature unset"
            )
        if not (isinstance(tolerance, int | float) and tolerance > 0):
            raise ValueError(f"tolerance must be a positive number, got {tolerance!r}")
    quadrature = quadrature or "gausslegendre"
    check_choice("quadrature", quadrature, _QUADRATURES)
    with model_scope(model, inputs, forward_args=forward_args, allow_tf32=allow_tf32) as fwd:
        base = make_baseline(
            inputs.detach(), baseline, blur_sigma=blur_sigma, seed=seed, model=model
        )
        return _integrate(
            fwd, inputs, target, base, steps, quadrature, tolerance, max_steps, batch_size, score
        )


def _integrate(
    forward: Forward,
    inputs: Tensor,
    target: TargetLike,
    base: Tensor,
    steps: int,
    quadrature: Quadrature,
    tolerance: float | None,
    max_steps: int,
    batch_size: BatchSize,
    score: Score,
) -> Attribution:
    x = inputs.detach()
    n = x.shape[0]
    same = (x == base).flatten(1).all(1).nonzero().flatten().tolist()
    if same:
        warn(
            f"Integrated Gradients: the baseline equals input sample(s) {same[:10]}, so their "
            "attributions are all zero (x - x' = 0); choose another baseline (a constant image "
            "equals its 'uniform' and 'blur' baselines)",
        )
    chunker = Chunker(
        inputs, batch_size, backward=True, owner=forward.model, kind="integrated_gradients"
    )

    rides = tolerance is None and clean_rows_ride_along(x.device, target) and not chunker.probing
    if rides:  # S(x) and S(x') ride in the first pass of the path (see clean_rows_ride_along)
        path = _Path(forward, None, base, x - base, chunker, target=(target, x, score))
    else:
        with torch.no_grad():  # S(x) and S(x') in one pass when the output is a plain batch
            samples = torch.arange(n, device=x.device)
            both = forward(torch.cat([x, base]), torch.cat([samples, samples]))
            if isinstance(both, Tensor) and both.ndim > 0 and both.shape[0] == 2 * n:
                out_x, out_b = both[:n], both[n:]
            else:
                out_x, out_b = forward(x.clone()), forward(base.clone())
        resolved = resolve_target(target, out_x, n, score=score)
        f_x, f_b = resolved.scores(out_x), resolved.scores(out_b)
        path = _Path(forward, resolved, base, x - base, chunker)

    if tolerance is None:
        alphas, weights = quadrature_nodes(quadrature, steps)
        acc = path.integrate(alphas, weights)
        used = torch.full((n,), steps, dtype=torch.long)
    else:
        acc, used = path.adaptive(f_x, f_b, steps, float(tolerance), max_steps)
    if rides:
        assert path.target is not None
        assert path.endpoints is not None
        resolved, out_x, out_b = path.target, path.endpoints[:n], path.endpoints[n:]
        f_x, f_b = resolved.scores(out_x), resolved.scores(out_b)
    values = (x - base) * acc.to(x.dtype)
    delta = values.double().flatten(1).sum(1) - (f_x.double() - f_b.double())
    if tolerance is not None:
        change = (f_x.double() - f_b.double()).abs()
        unmet = (delta.abs() > tolerance * change.clamp(min=1e-12)).nonzero().flatten().tolist()
        if unmet:
            gaps = ", ".join(
                f"{float(delta[i] / change[i].clamp(min=1e-12)):.2%}" for i in unmet[:5]
            )
            warn(
                f"Integrated Gradients: the adaptive path reached max_steps={max_steps} before "
                f"the completeness gap met tolerance={tolerance:g} for sample(s) {unmet[:10]} "
                f"(relative gap {gaps}); raise max_steps or tolerance, and see "
                "extras['delta']",
            )
    return Attribution(
        values=values,
        target=resolved.classes,
        scores=f_x,
        method="integrated_gradients",
        output=out_x,
        extras={
            "delta": delta.to(x.dtype),
            "steps": used,
            "baseline": base,
            "baseline_scores": f_b,
        },
        reduction="sum",
    )


def make_baseline(
    x: Tensor,
    baseline: BaselineLike,
    *,
    blur_sigma: float | None = None,
    seed: int = 0,
    model: object = None,
) -> Tensor:
    """Build the ``(N, C, H, W)`` baseline for ``x`` (``model``: the normalisation of black)."""
    if isinstance(baseline, Tensor):
        if not baseline.is_floating_point():
            raise TypeError(f"baseline tensor must be floating point, got {baseline.dtype}")
        try:
            base = torch.broadcast_to(baseline.detach().to(x.device, x.dtype), x.shape)
        except RuntimeError:
            raise ValueError(
                f"baseline of shape {tuple(baseline.shape)} does not broadcast to the inputs "
                f"{tuple(x.shape)}"
            ) from None
        if not all_finite(base):
            raise ValueError("baseline contains NaN or inf values")
        return base.clone()
    if isinstance(baseline, int | float) and not isinstance(baseline, bool):
        if not math.isfinite(baseline):
            raise ValueError(f"baseline must be finite, got {baseline}")
        return torch.full_like(x, float(baseline))
    if baseline == "zeros":
        return torch.zeros_like(x)
    if baseline == "black":
        return black_image(x, model)
    if baseline == "uniform":
        generator = torch.Generator().manual_seed(seed)
        u = torch.rand(x.shape[1:], generator=generator, dtype=torch.float64)
        lo = x.flatten(1).amin(1).view(-1, 1, 1, 1)
        hi = x.flatten(1).amax(1).view(-1, 1, 1, 1)
        return (lo + (hi - lo) * u.to(x.device, x.dtype)).to(x.dtype)
    if baseline == "blur":
        sigma = blur_sigma if blur_sigma is not None else max(x.shape[-2:]) / 20
        return gaussian_blur(x, float(sigma))
    raise ValueError(
        f"unknown baseline {baseline!r}; expected 'zeros', 'black', 'blur', 'uniform', a number "
        "or a tensor"
    )


def black_image(x: Tensor, model: object) -> Tensor:
    """Return the black image in the model's input space: ``(0 - mean) / std`` per channel.

    Raises:
        ValueError: the model does not carry its normalisation as ``mean`` and ``std``.
    """
    mean, std = getattr(model, "mean", None), getattr(model, "std", None)
    if mean is None or std is None:
        raise ValueError(
            f"baseline='black' needs the model's input normalisation, but this "
            f"{type(model).__name__} has no 'mean' and 'std' attributes; pass the black image "
            "yourself, baseline=torch.tensor([(0 - m) / s for m, s in zip(mean, std)])"
            ".view(1, -1, 1, 1), or baseline='zeros' for zero in the normalised space"
        )
    c = x.shape[1]
    mean_t = torch.as_tensor(mean, dtype=torch.float64).flatten()
    std_t = torch.as_tensor(std, dtype=torch.float64).flatten()
    if mean_t.numel() not in (1, c) or std_t.numel() not in (1, c):
        raise ValueError(
            f"the model's mean/std have {mean_t.numel()}/{std_t.numel()} values for {c} channels"
        )
    black = (-mean_t / std_t).expand(c).to(x.device, x.dtype).view(1, c, 1, 1)
    return black.expand_as(x).clone()


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``(N, C, H, W)`` images with mirrored borders.

    The borders mirror without repeating the edge pixel (``F.pad(mode="reflect")``, SciPy's
    ``mode="mirror"``); the kernel radius is ``ceil(3 sigma)``, at most the shorter side - 1.
    """
    if sigma <= 0:
        raise ValueError(f"blur sigma must be positive, got {sigma}")
    radius = max(1, min(math.ceil(3 * sigma), min(x.shape[-2:]) - 1))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.device, x.dtype)
    c = x.shape[1]
    y = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(y, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


@dataclass
class _Grid:
    """The adaptive path of one group of samples that share their nodes."""

    samples: Tensor  # (g,) sample indices
    alphas: list[float] = field(default_factory=list)
    f: dict[float, Tensor] = field(default_factory=dict)  # alpha -> (g,) scores
    g: dict[float, Tensor] = field(default_factory=dict)  # alpha -> (g,) <grad, x - x'>
    grad: dict[float, Tensor] = field(default_factory=dict)  # alpha -> (g, C, H, W)


class _Path:
    """Gradients along the straight path ``x' + alpha (x - x')``, batched in chunks.

    Without a resolved target, ``target`` is ``(target=, x, score=)``: the first pass also runs
    the endpoints (rows ``[x, x']`` before the path's), resolves the target on ``x`` and keeps
    their output in :attr:`endpoints` (see
    :func:`~salience.methods.gradient.clean_rows_ride_along`).
    """

    def __init__(
        self,
        forward: Forward,
        resolved: ResolvedTarget | None,
        base: Tensor,
        diff: Tensor,
        chunker: Chunker,
        *,
        target: tuple[TargetLike, Tensor, Score] | None = None,
    ) -> None:
        self.forward = forward
        self.target = resolved
        self.base = base
        self.diff = diff
        self.n = base.shape[0]
        self.chunker = chunker
        self.endpoints: Tensor | None = None  # output at [x, x'] when they ride along
        self._ends = target

    def _chunks(
        self, samples: Tensor, alphas: Tensor, keep: Callable[[slice, Tensor, Tensor], None]
    ) -> None:
        """Call ``keep(rows, scores, grads)`` for the rows ``(samples[r], alphas[r])``, by pass.

        ``keep`` runs inside the pass: one that runs out of memory is redone, so ``keep``
        makes every tensor it needs before it writes (see :class:`salience._chunks.Chunker`).
        """
        # callables see whole batches (a target still to resolve is a class target)
        unit = self.n if self.target is not None and self.target.fn is not None else 1
        for part in self.chunker.passes(samples.shape[0], unit):
            with part as (start, stop):
                rows = slice(start, stop)
                s = samples[rows]
                a = alphas[rows].to(self.base.dtype).view(-1, 1, 1, 1)
                point = (self.base[s] + a * self.diff[s]).requires_grad_(True)
                if self.target is None:
                    assert self._ends is not None
                    asked, x, score = self._ends
                    resolved, ends, scores, grad = score_gradient_with_clean(
                        self.forward, point, s, torch.cat([x, self.base]), asked, score=score
                    )
                    keep(rows, scores, grad)
                    self.target, self.endpoints = resolved, ends
                else:
                    scores, grad = score_gradient(self.forward, point, self.target, s)
                    keep(rows, scores, grad)

    def integrate(self, alphas: Tensor, weights: Tensor) -> Tensor:
        """Return ``sum_j w_j grad(alpha_j)`` per sample, ``(N, C, H, W)``, in the input dtype."""
        device, dtype = self.base.device, self.base.dtype
        steps = alphas.shape[0]
        rows = torch.arange(steps * self.n, device=device)  # step-major: whole batch copies
        samples, step = rows % self.n, rows // self.n
        row_alphas = alphas.to(device)[step]
        row_weights = weights.to(device, dtype)[step]
        acc = torch.zeros(self.base.shape, dtype=dtype, device=device)

        def keep(chunk: slice, _: Tensor, grad: Tensor) -> None:  # row r: sample r % N
            add_rows(acc, grad * row_weights[chunk].view(-1, 1, 1, 1), chunk.start)

        self._chunks(samples, row_alphas, keep)
        return acc

    def _evaluate(self, grids: list[_Grid], wanted: list[list[float]]) -> None:
        """Evaluate each grid at its new nodes, packing them into shared forward passes."""
        device = self.base.device
        samples, alphas, owners = [], [], []
        for gi, (grid, new) in enumerate(zip(grids, wanted, strict=True)):
            for alpha in new:
                samples.append(grid.samples)
                alphas.append(torch.full(grid.samples.shape, alpha, dtype=torch.float64))
                owners.append((gi, alpha, grid.samples.shape[0]))
        if not samples:
            return
        all_samples = torch.cat(samples).to(device)
        all_alphas = torch.cat(alphas).to(device)
        scores = torch.empty(all_samples.shape[0], dtype=self.base.dtype, device=device)
        grads = torch.empty(
            (all_samples.shape[0], *self.base.shape[1:]), dtype=self.base.dtype, device=device
        )

        def keep(rows: slice, s: Tensor, g: Tensor) -> None:
            scores[rows], grads[rows] = s, g

        self._chunks(all_samples, all_alphas, keep)
        inner = (grads.double() * self.diff[all_samples].double()).flatten(1).sum(1)
        start = 0
        for gi, alpha, size in owners:
            grid = grids[gi]
            rows = slice(start, start + size)
            grid.f[alpha], grid.g[alpha], grid.grad[alpha] = (
                scores[rows].double(),
                inner[rows],
                grads[rows],
            )
            start += size
        for grid, new in zip(grids, wanted, strict=True):
            grid.alphas = sorted(set(grid.alphas).union(new))

    def adaptive(
        self, f_x: Tensor, f_b: Tensor, steps: int, tolerance: float, max_steps: int
    ) -> tuple[Tensor, Tensor]:
        """Adaptive trapezoid rule; returns the weighted gradient sum and nodes per sample."""
        device = self.base.device
        assert self.target is not None  # the adaptive path resolves its target first
        if self.target.fn is None:
            grids = [_Grid(torch.tensor([i], device=device)) for i in range(self.n)]
        else:  # a callable target is evaluated on the whole batch at once: one shared grid
            grids = [_Grid(torch.arange(self.n, device=device))]
        scale = (f_x.double() - f_b.double()).abs().clamp(min=1e-12)
        first = [i / steps for i in range(steps + 1)]
        self._evaluate(grids, [first] * len(grids))
        while True:
            wanted = [_refine(grid, scale[grid.samples], tolerance, max_steps) for grid in grids]
            if not any(wanted):
                break
            self._evaluate(grids, wanted)
        acc = torch.zeros(self.base.shape, dtype=torch.float64, device=device)
        used = torch.zeros(self.n, dtype=torch.long)
        for grid in grids:
            a = grid.alphas
            for i, alpha in enumerate(a):
                left = alpha - a[i - 1] if i > 0 else 0.0
                right = a[i + 1] - alpha if i + 1 < len(a) else 0.0
                acc[grid.samples] += (left + right) / 2 * grid.grad[alpha].double()
            used[grid.samples.cpu()] = len(a)
        return acc, used


def _refine(grid: _Grid, scale: Tensor, tolerance: float, max_steps: int) -> list[float]:
    """Midpoints of the intervals to bisect next, or ``[]`` when the grid is good enough.

    Each interval's error is exact: ``h/2 (g_a + g_b) - (S(b) - S(a))``, because the integral
    of the path gradient over the interval is the change of the score. The grid is done when
    the summed (signed) error, the completeness gap, is within ``tolerance * scale`` for every
    sample. Otherwise the worst intervals are bisected, greedily, until the absolute error
    left in the others is under half the tolerance.
    """
    a = grid.alphas
    lo, hi = torch.tensor(a[:-1]), torch.tensor(a[1:])
    f = torch.stack([grid.f[t] for t in a])  # (nodes, g)
    g = torch.stack([grid.g[t] for t in a])
    h = (hi - lo).double().view(-1, 1).to(f.device)
    err = (h / 2 * (g[:-1] + g[1:]) - (f[1:] - f[:-1])) / scale  # (intervals, g)
    if bool((err.sum(0).abs() <= tolerance).all()):
        return []
    room = max_steps - len(a)
    if room <= 0:
        return []
    badness = err.abs().amax(1)
    badness[(hi - lo) < 1e-9] = 0.0  # cannot split further in float64 in any useful way
    order = torch.argsort(badness, descending=True)
    left = float(badness.sum())
    picked: list[float] = []
    for i in order.tolist():
        if left <= tolerance / 2 or len(picked) >= room or badness[i] == 0:
            break
        picked.append((a[i] + a[i + 1]) / 2)
        left -= float(badness[i])
    return picked
