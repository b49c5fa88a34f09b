r"""Perturbation methods: occlusion (Zeiler & Fergus 2013) and RISE (Petsiuk et al. 2018).

Both explain a model by changing its input and watching the score, with no gradient: every
perturbed input runs under :func:`torch.inference_mode` (no autograd graph), ``batch_size``
rows per forward pass, on the inputs' device, through :func:`salience._forward.model_scope`
(extra ``forward_args`` follow their rows, buffers are restored, TF32 is off unless
``allow_tf32=True``). With class targets each pass holds the rows of one sample, split the
same way whatever the batch, so that a sample's map is the same bit for bit alone or in a
batch (occlusion subtracts two nearly equal scores, which would show the rounding
differences of different batch sizes); a callable target is applied to whole copies of the
batch, so its passes hold one row per sample. Occlusion runs the model box by box where it
can (exact incremental inference, :mod:`salience.methods.incremental`).

Shapes. Both are ``"pixel"`` methods: ``values`` has the shape of the inputs,
``(N, C, H, W)``. A window or a mask hides every channel of a pixel together, so every
channel of a pixel holds that pixel's value (as in Captum's ``Occlusion`` with a window that
spans the channels); the single-channel map is ``values[:, 0]``.
:meth:`~salience.Attribution.saliency` returns that map (the mean over channels). With
``K`` targets per sample (an ``(N, K)`` target tensor, all read from the same forward
passes) ``values`` is ``(N, K, H, W)``, one single-channel map per target, and
``saliency()`` refuses to merge them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, Literal, TypeAlias

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import CPU_IMAGES, check_positive_int, even_chunks, warn_zero_maps
from .._chunks import BatchSize, Chunker
from .._containers import map_tensors
from .._forward import Forward, ForwardArgs, model_scope
from .._io import Progress
from ..attribution import Attribution
from ..registry import register
from ..targets import ResolvedTarget, Score, TargetLike, resolve_target
from ._incremental_approx import Approximation, approximate_scores, check_approximation
from .incremental import occlusion_scores, pass_count, plan_incremental, record_pass
from .integrated import gaussian_blur

__all__ = ["Approximation", "Fill", "occlusion", "rise"]

Fill: TypeAlias = "Literal['zeros', 'mean', 'blur'] | float | Tensor"
"""What an occluded patch shows: ``"zeros"``; ``"mean"``, each image's mean per channel (a
grey square, as Zeiler & Fergus); ``"blur"``, a Gaussian blur of the image (``blur_sigma``);
a number, a constant; or a baseline image, a tensor broadcastable to the inputs."""

_FILLS = ("zeros", "mean", "blur")


# -- occlusion ----------------------------------------------------------------------------------


@register("occlusion")
def occlusion(
    model: nn.Module,
    inputs: Tensor,
    target: TargetLike = None,
    *,
    window: int | tuple[int, int] | None = None,
    stride: int | tuple[int, int] | None = None,
    fill: Fill = "zeros",
    blur_sigma: float | None = None,
    score: Score = "logit",
    batch_size: BatchSize = "auto",
    forward_args: ForwardArgs = None,
    allow_tf32: bool = False,
    incremental: bool = True,
    approximate: Approximation | dict[str, Any] | None = None,
    progress: bool | None = False,
) -> Attribution:
    r"""Occlusion (Zeiler & Fergus 2013): the score drop when a patch of the image is hidden.

    A ``window`` slides over the image with ``stride``; at each position ``w`` the patch
    (all channels) is replaced by ``fill`` and the score is recomputed. Each pixel gets the mean
    drop over the windows that cover it:

    .. math:: A(\lambda) = \frac{1}{|W_\lambda|} \sum_{w \in W_\lambda}
              \big(S_c(x) - S_c(x \odot (1 - m_w) + b \odot m_w)\big)

    with :math:`m_w` the window's mask, :math:`b` the fill and :math:`W_\lambda` the windows
    covering pixel :math:`\lambda`. This is Captum's ``Occlusion`` with
    ``sliding_window_shapes=(C, h, w)``, ``strides=(C, sh, sw)`` and ``baselines=fill``, to
    float tolerance, border included: windows start at ``0, stride, 2 stride, ...`` until the
    image is covered, ``ceil((H - h) / sh) + 1`` positions down, and the last one is cut off
    at the border when the window does not tile the image. A pixel outside the receptive
    field of the score gets exactly zero.

    The windows run ``batch_size`` rows per forward pass (the result does not depend on it)
    without an autograd graph, each pass with the clean image beside its occluded ones: a drop
    subtracts scores of the same pass, so a window that cannot change the score gives
    exactly 0. ``K`` targets per sample come from the same passes. By default each occluded
    image is computed incrementally from the clean activations where the model allows it
    (``incremental``), which is exact to float rounding and much faster on CNNs.

    Zeiler & Fergus plotted the probability of the true class (``score="probability"``); the
    default, as Captum, follows the raw output (``"logit"``), which does not saturate.

    Args:
        model: Any PyTorch model; no gradient is needed.
        inputs: ``(N, C, H, W)`` preprocessed images.
        target: What to explain; see :mod:`salience.targets`. An ``(N, K)`` integer tensor
            explains ``K`` classes per sample from the same passes. A callable target is
            evaluated on whole copies of the batch (``N`` rows, one per sample, in order).
        window: Patch size, ``int`` or ``(h, w)``, at most the image size; ``None``: 16, or a
            quarter of the shorter side for images under 64 pixels.
        stride: Step between window positions, ``int`` or ``(sh, sw)``; at most the window
            (otherwise pixels between windows would never be hidden); ``None``: half the
            window.
        fill: What the patch shows; see :data:`Fill`. ``"zeros"`` is the mean image for
            inputs normalised per channel.
        blur_sigma: Gaussian standard deviation in pixels for ``fill="blur"``; ``None``: half
            the window's longer side.
        score: ``"logit"`` (default), ``"probability"`` or ``"log_probability"`` of a class
            target; a callable target defines its own score.
        batch_size: Occluded images per forward pass, or ``"auto"``: from the device (see
            :mod:`salience._chunks`; on CUDA the clean pass is the probe).
        forward_args: Extra arguments for the model after the image (see
            :func:`salience.gradient`); tensors with the batch size as first axis follow
            their rows.
        allow_tf32: Let CUDA use TF32 (faster, less exact); off by default.
        incremental: Compute each occluded image from the clean activations, recomputing
            only the region the patch reaches, where the model allows it (Krypton; see
            :mod:`salience.methods.incremental`): the same result to float rounding, faster.
            Models it cannot speed up run full passes; ``extras["incremental"]`` names the
            layers run incrementally, or why none was.
        approximate: ``None`` (default): the exact map. Else Krypton's approximate mode
            (Nakandala et al. 2019), faster and **not exact**: a dict (or
            :class:`~salience.methods.perturbation.Approximation`) with ``tau``,
            the projective-field threshold in ``(0, 1]`` (each layer recomputes at most
            this fraction of its output height and width around the patch's projection and
            keeps clean activations outside; incremental models only), ``drill_down``, the
            fraction in ``(0, 1]`` of window positions evaluated at ``stride`` after a coarse
            pass at ``coarse * stride`` (the others are interpolated bilinearly from the
            coarse windows), and ``coarse`` (int >= 2, default 2). ``tau = drill_down = 1``
            is exact. ``bench/bench_perturbation.py`` reports the error (SSIM, largest
            difference) against the exact map: ``{"drill_down": 0.25}`` is about 2x faster
            than exact (SSIM 0.75-0.78 on the bench's nets); ``tau`` suits networks whose
            projective fields grow slowly (on EfficientNet-Lite0, ``tau < 0.9`` loses most
            of the map).
        progress: Show a progress bar on stderr (``None``: only on a terminal).

    Returns:
        ``values`` ``(N, C, H, W)`` (every channel the same) or ``(N, K, H, W)``; ``scores``
        the clean scores; ``extras["occluded_scores"]`` ``(N, rows, cols)`` (``(N, K, rows,
        cols)``), the score with the patch at each window position (the map Zeiler & Fergus
        show), ``extras["windows"]`` the number of windows per sample, ``extras["coverage"]``
        ``(H, W)`` how many windows cover each pixel, ``extras["incremental"]`` the names of
        the layers run box by box, or why none was, ``extras["mode"]`` ``"exact"`` or
        ``"approximate"``, ``extras["approximate"]`` ``None`` or what the approximate mode
        did: its settings, ``coarse_stride``, ``windows``, ``tau_applied`` and
        ``recomputed_fraction`` (activations recomputed per window relative to exact
        incremental inference); then also ``extras["windows_evaluated"]`` ``(N,)`` and
        ``extras["evaluated"]`` ``(N, rows, cols)`` (``False``: interpolated).

    Raises:
        ValueError: a window larger than the image, a stride larger than the window, a bad
            fill, a bad ``approximate`` option, a bad target (see
            :func:`salience.targets.resolve_target`).

    References:
        Zeiler, Fergus. Visualizing and Understanding Convolutional Networks. ECCV 2014,
        arXiv:1311.2901.
    """
    spec = check_approximation(approximate)
    with model_scope(model, inputs, forward_args=forward_args, allow_tf32=allow_tf32) as fwd:
        x = inputs.detach()
        n, _, h, w = x.shape
        if window is None:
            window = min(16, max(1, min(h, w) // 4))
        if stride is None:
            half = _pair("window", window)
            stride = (max(1, half[0] // 2), max(1, half[1] // 2))
        (wh, ww), (sh, sw) = _window(window, stride, h, w)
        ys, xs = _starts(h, wh, sh), _starts(w, ww, sw)
        if blur_sigma is None:
            blur_sigma = max(wh, ww) / 2
        base = replacement_image(fill, x, blur_sigma)
        chain, why = plan_incremental(model, fwd.has_args) if incremental else (None, "off")
        # Incremental passes are cheap per row: ten 224² images per pass on the CPU.
        images = 10 if chain is not None else CPU_IMAGES
        chunker = Chunker(inputs, batch_size, owner=fwd.model, kind="occlusion", images=images)
        with chunker.measure(n):  # the clean pass measures a row's footprint (CUDA)
            output, resolved = _resolve(fwd, x, target, score)
        if chain is not None:
            chain.output = output  # the structure the target reads
        multi = resolved.classes is not None and resolved.classes.ndim == 2
        k = resolved.classes.shape[1] if multi else 1  # type: ignore[union-attr]

        device = x.device
        hh, ww_ = torch.arange(h, device=device), torch.arange(w, device=device)
        # Every pass (box by box or full) holds clean rows, and the drops of its windows are
        # taken from the clean score of the same pass: a window that cannot change the score
        # gives exactly 0, even where a batch's size changes the model's rounding.
        starts_y = torch.tensor([y for y in ys for _ in xs], device=device)
        starts_x = torch.tensor([c for _ in ys for c in xs], device=device)
        windows = len(ys) * len(xs)
        # The fewest rows of a pass: a clean row and an occluded one (whole copies of the
        # batch for a callable target). Out of memory: redone with half the rows per pass.
        planned = why
        for plan in chunker.plans(2 * n if resolved.fn is not None else 2):
            with plan as most:
                why = planned
                found: tuple[Tensor, Tensor, Tensor] | None = None
                local: list[str] = []
                record: dict[str, Any] | None = None
                per_sample: dict[str, Tensor] = {}
                if spec is not None:  # Krypton's approximate mode
                    found, local, approx_why, record, per_sample = approximate_scores(
                        spec, chain, fwd, resolved, x, base, starts_y, starts_x, (wh, ww),
                        (len(ys), len(xs)), (sh, sw), most, progress,
                    )  # fmt: skip
                    why = approx_why or why
                passes = pass_count(windows, n, most, resolved.fn is not None)
                if chain is not None and spec is None:
                    with Progress(passes, "occlusion (incremental)", enabled=progress) as bar:
                        found, local = occlusion_scores(
                            chain,
                            resolved.scores,
                            resolved.fn is not None,
                            x,
                            base,
                            starts_y,
                            starts_x,
                            (wh, ww),
                            most,
                            bar.update,
                        )
                    if found is None:
                        why = "no convolution or pooling of the model can run box by box"
                if found is None:
                    with Progress(passes, "occlusion", enabled=progress) as bar:
                        found = full_scores(
                            fwd, resolved, x, base, torch.arange(n, device=device), starts_y,
                            starts_x, (wh, ww), most, bar.update,
                        )  # fmt: skip
        assert found is not None
        clean, occluded, drop = found  # (N, K), (P, N, K), (P, N, K)
        total = torch.empty(n, k, h, w, dtype=drop.dtype, device=device)
        patch_y = ((hh >= starts_y[:, None]) & (hh < (starts_y + wh)[:, None])).to(drop.dtype)
        patch_x = ((ww_ >= starts_x[:, None]) & (ww_ < (starts_x + ww)[:, None])).to(drop.dtype)
        for i in range(n):  # one sample at a time: the same sums whatever the batch
            # Terms of windows that miss a pixel are exact zeros: a pixel that no window with a
            # non-zero drop covers gets exactly 0, not a rounding residue.
            total[i] = torch.einsum("pk,ph,pw->khw", drop[:, i], patch_y, patch_x)
        coverage = _cover(hh, ys, wh)[:, None] * _cover(ww_, xs, ww)[None, :]  # (H, W), >= 1
        maps = (total / coverage).to(x.dtype)  # (N, K, H, W)
        occluded_scores = occluded.permute(1, 2, 0).reshape(n, k, len(ys), len(xs))
        if multi:
            values = maps
        else:
            values = maps.expand(n, x.shape[1], h, w).contiguous()
            occluded_scores, clean = occluded_scores[:, 0], clean[:, 0]
        warn_zero_maps(
            "occlusion",
            values,
            "(hiding any patch leaves the score unchanged: the fill equals the image there, or "
            "the score does not depend on the input)",
        )
        return Attribution(
            values=values,
            target=resolved.classes,
            scores=clean,
            method="occlusion",
            output=output,
            extras={
                "occluded_scores": occluded_scores,
                "windows": windows,
                "coverage": coverage,
                "incremental": local if local else why,
                "mode": "exact" if record is None else record["mode"],
                "approximate": record,
                **per_sample,
            },
            reduction="none" if multi else "mean",
        )


def _window(
    window: int | tuple[int, int], stride: int | tuple[int, int], h: int, w: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Check ``window`` and ``stride`` against an ``h x w`` image; return them as pairs."""
    win = _pair("window", window)
    step = _pair("stride", stride)
    if win[0] > h or win[1] > w:
        raise ValueError(
            f"the occlusion window {win[0]}x{win[1]} is larger than the {h}x{w} inputs; pass a "
            "smaller window="
        )
    for axis, size, a, s in (("height", h, win[0], step[0]), ("width", w, win[1], step[1])):
        if s > a and a < size:
            raise ValueError(
                f"the stride {s} is larger than the window {a} along the {axis}: pixels "
                "between windows would never be occluded; pass stride <= window"
            )
    return win, step


def _cover(pixels: Tensor, starts: list[int], window: int) -> Tensor:
    """How many windows starting at ``starts`` cover each pixel of one axis."""
    begin = torch.tensor(starts, device=pixels.device)
    return ((pixels[:, None] >= begin) & (pixels[:, None] < begin + window)).sum(1)


def _pair(name: str, value: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(value, tuple | list) and len(value) == 2:
        return check_positive_int(name, value[0]), check_positive_int(name, value[1])
    if isinstance(value, tuple | list):
        raise ValueError(f"{name} must be an int or a pair (h, w), got {value!r}")
    v = check_positive_int(name, value)
    return v, v


def _starts(size: int, window: int, stride: int) -> list[int]:
    """Return the window starts along one axis, Captum's convention.

    ``ceil((size - window) / stride) + 1`` positions from 0; the last window may extend past
    the border (it is cut off there).
    """
    count = -(-(size - window) // stride) + 1
    return [i * stride for i in range(count)]


def replacement_image(
    spec: Any,
    x: Tensor,
    blur_sigma: float,
    *,
    name: str = "fill",
    choices: tuple[str, ...] = _FILLS,
) -> Tensor:
    """Return the ``(N, C, H, W)`` image hidden pixels take their values from.

    Shared by occlusion's ``fill`` and the deletion/insertion ``substrate``
    (:mod:`salience.metrics.faithfulness`), which names it with ``name`` and allows the
    strings in ``choices``: ``"zeros"``, ``"mean"`` (each image's channel means), ``"blur"``
    (a Gaussian blur, ``blur_sigma`` pixels); or a finite number (a constant image); or a
    tensor broadcastable to ``x`` (a baseline image).
    """
    if isinstance(spec, str) and spec in choices:
        if spec == "zeros":
            return torch.zeros_like(x)
        if spec == "mean":
            return x.mean(dim=(2, 3), keepdim=True).expand_as(x).contiguous()
        if spec == "blur":
            if not (isinstance(blur_sigma, numbers.Real) and blur_sigma > 0):
                raise ValueError(f"blur_sigma must be a positive number, got {blur_sigma!r}")
            return gaussian_blur(x, float(blur_sigma))
    elif isinstance(spec, numbers.Real) and not isinstance(spec, bool):
        if not math.isfinite(float(spec)):
            raise ValueError(f"{name} must be finite, got {spec}")
        return torch.full_like(x, float(spec))
    elif isinstance(spec, Tensor):
        try:
            return spec.detach().to(x.device, x.dtype).expand_as(x).contiguous()
        except RuntimeError as error:
            raise ValueError(
                f"a {name} tensor (baseline image) must broadcast to the inputs "
                f"{tuple(x.shape)}; got shape {tuple(spec.shape)}"
            ) from error
    raise ValueError(
        f"unknown {name} {spec!r}; expected one of: {', '.join(choices)}, a number or a tensor "
        "broadcastable to the inputs (a baseline image)"
    )


def _resolve(
    fwd: Forward, x: Tensor, target: TargetLike, score: Score
) -> tuple[object, ResolvedTarget]:
    """Run the clean batch once: the model output (for the user) and the resolved target."""
    n = x.shape[0]
    with torch.inference_mode():
        output = fwd(x.clone(), torch.arange(n, device=x.device))
    output = _normal(output)
    return output, resolve_target(target, output, n, score=score, multi=True)


def full_scores(
    fwd: Forward,
    resolved: ResolvedTarget,
    x: Tensor,
    base: Tensor,
    samples: Tensor,
    starts_y: Tensor,
    starts_x: Tensor,
    window: tuple[int, int],
    most: int,
    tick: Callable[[], None],
) -> tuple[Tensor, Tensor, Tensor]:
    """Occlusion scores of the windows starting at ``starts`` ``(P,)``, with full passes.

    For the rows ``samples`` of ``x`` (``n`` of them), in the passes of :func:`_plan`
    (``tick`` after each): ``(clean (n, K), occluded (P, n, K), drop (P, n, K))`` as
    :func:`~salience.methods.incremental.record_pass` stores them.
    """
    _, _, h, w = x.shape
    wh, ww = window
    device = x.device
    n, count = samples.numel(), starts_y.shape[0]
    # Window 0 is the clean image (its window starts past the border: it hides nothing).
    sy = torch.cat([starts_y.new_tensor([h]), starts_y])
    sx = torch.cat([starts_x.new_tensor([w]), starts_x])
    hh, ww_ = torch.arange(h, device=device), torch.arange(w, device=device)
    in_y = (hh >= sy[:, None]) & (hh < (sy + wh)[:, None])  # (1 + P, H)
    in_x = (ww_ >= sx[:, None]) & (ww_ < (sx + ww)[:, None])  # (1 + P, W)
    found: tuple[Tensor, Tensor, Tensor] | None = None
    for rows, win in _plan(n, count, most, resolved, device):
        ids = samples[rows]
        mask = in_y[win, None, :, None] & in_x[win, None, None, :]  # (R, 1, H, W)
        images = torch.where(mask, base[ids], x[ids])
        part = _scores(fwd, resolved, images, ids).reshape(rows.numel(), -1)
        found = record_pass(found, part, rows, win, n, count)
        tick()
    assert found is not None
    return found


def _plan(
    n: int, windows: int, most: int, resolved: ResolvedTarget, device: torch.device
) -> list[tuple[Tensor, Tensor]]:
    """Split the windows ``1 .. P`` of ``n`` samples into passes: ``[(samples, windows)]``.

    Each pass starts with clean rows (window 0) of its samples. For class targets every pass
    holds rows of one sample, split the same way for every sample, so a sample's passes (and
    its map, bit for bit) do not depend on the batch it is in. A callable target is applied
    to whole copies of the batch (one row per sample, in order): its passes hold whole
    copies, window-major.
    """
    # Window indices are made on the device: no host-to-device copy per pass.
    zero = torch.zeros(1, dtype=torch.long, device=device)
    if resolved.fn is None:
        chunk = even_chunks(windows, max(1, most - 1))
        plan = []
        for i in range(n):
            for start in range(1, windows + 1, chunk):
                stop = min(start + chunk, windows + 1)
                win = torch.cat([zero, torch.arange(start, stop, device=device)])
                plan.append((torch.full((win.numel(),), i, device=device), win))
        return plan
    per = max(1, most // n - 1)
    samples = torch.arange(n, device=device)
    plan = []
    for start in range(1, windows + 1, per):
        stop = min(start + per, windows + 1)
        win = torch.cat([zero, torch.arange(start, stop, device=device)])
        plan.append((samples.repeat(win.numel()), win.repeat_interleave(n)))
    return plan


def _scores(fwd: Forward, resolved: ResolvedTarget, images: Tensor, ids: Tensor) -> Tensor:
    """Scores of perturbed rows, computed without autograd; a normal (not inference) tensor."""
    with torch.inference_mode():
        scores = resolved.scores(fwd(images, ids), ids)
    return scores.clone()


def _normal(value: object) -> object:
    """Clone inference tensors (in nested outputs too) into normal ones, for the user."""
    return map_tensors(lambda t: t.clone() if t.is_inference() else t, value)


# -- RISE -----------------------------------------------------------------------------------------


@register("rise")
def rise(
    model: nn.Module,
    inputs: Tensor,
    target: TargetLike = None,
    *,
    masks: int = 4000,
    cells: int = 7,
    p: float = 0.5,
    seed: int = 0,
    score: Score | None = None,
    batch_size: BatchSize = "auto",
    forward_args: ForwardArgs = None,
    allow_tf32: bool = False,
    progress: bool | None = False,
) -> Attribution:
    r"""RISE (Petsiuk, Das & Saenko 2018): the score-weighted average of random masks.

    .. math:: S(\lambda) = \frac{1}{N \, p} \sum_{i=1}^{N} f(x \odot M_i) \, M_i(\lambda)

    This is the Monte-Carlo estimate (Eq. 6) of
    :math:`\mathbb{E}[f(x \odot M) M(\lambda)] / \mathbb{E}[M(\lambda)]` (Eq. 5). The masks
    are the paper's (Sec. 3.2) and the authors' code's: an ``s x s`` grid of cells (``cells``)
    kept with probability ``p``, upsampled bilinearly to ``(s + 1) * cell`` with
    ``cell = ceil(H / s)`` (the code's ceiling; the paper writes a floor, which does not leave
    room for the shift when ``s`` does not divide ``H``), then cropped to ``H x W`` at a shift
    drawn uniformly from ``0 .. cell - 1`` in each direction. Bilinear interpolation of
    Bernoulli(``p``) cells has mean exactly ``p`` at every pixel, so
    :math:`\mathbb{E}[M(\lambda)] = p` and the map is divided by ``N p``, as in the authors'
    code (not by the empirical mean of the drawn masks, which would bias the estimate
    towards pixels that happened to be kept often).

    The same ``N`` masks (drawn from ``seed``, on the inputs' device) are applied to every
    sample, so a sample's map does not depend on the batch it is in; the ``N x batch`` masked
    images run ``batch_size`` rows per pass without an autograd graph, and ``K`` targets per
    sample come from the same passes.

    Args:
        model: Any PyTorch model; no gradient is needed.
        inputs: ``(N, C, H, W)`` preprocessed images.
        target: What to explain; see :mod:`salience.targets`. An ``(N, K)`` integer tensor
            explains ``K`` classes per sample from the same passes. A callable target is
            evaluated on whole copies of the batch (one masked image per sample, in order).
        masks: Number of masks ``N`` (the paper: 4000 for ResNet-50).
        cells: Grid side ``s`` of the low-resolution masks (the paper: 7).
        p: Probability that a cell is kept (the paper: 0.5).
        seed: Seed of the masks; the same seed on the same device gives the same masks.
        score: For class targets, ``"probability"`` (the default, ``None``: the paper's
            softmax), ``"logit"`` or ``"log_probability"``; a callable target gives its own.
        batch_size: Masked images per forward pass, or ``"auto"``: from the device (see
            :mod:`salience._chunks`; on CUDA the clean pass is the probe).
        forward_args: Extra arguments for the model after the image (see
            :func:`salience.gradient`).
        allow_tf32: Let CUDA use TF32 (faster, less exact); off by default.
        progress: Show a progress bar on stderr (``None``: only on a terminal).

    Returns:
        ``values`` ``(N, C, H, W)`` (every channel the same map) or ``(N, K, H, W)``;
        ``scores`` the scores of the unmasked inputs; ``extras["masks"]`` ``N``.

    Raises:
        ValueError: ``p`` not in ``(0, 1]``, ``cells`` larger than the image, a bad target.

    References:
        Petsiuk, Das, Saenko. RISE: Randomized Input Sampling for Explanation of Black-box
        Models. BMVC 2018, arXiv:1806.07421.
    """
    check_positive_int("masks", masks)
    check_positive_int("cells", cells)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if not (isinstance(p, numbers.Real) and 0 < p <= 1):
        raise ValueError(f"p, the probability of keeping a cell, must be in (0, 1], got {p!r}")
    with model_scope(model, inputs, forward_args=forward_args, allow_tf32=allow_tf32) as fwd:
        if score is None:
            score = (
                "logit" if callable(target) and not isinstance(target, Tensor) else "probability"
            )
        x = inputs.detach()
        n, _, h, w = x.shape
        if cells > min(h, w):
            raise ValueError(
                f"cells={cells} is more than the {h}x{w} image has pixels across; pass a "
                "smaller cells="
            )
        chunker = Chunker(inputs, batch_size, owner=fwd.model, kind="rise")
        with chunker.measure(n):  # the clean pass measures a row's footprint (CUDA)
            output, resolved = _resolve(fwd, x, target, score)
        multi = resolved.classes is not None and resolved.classes.ndim == 2
        k = resolved.classes.shape[1] if multi else 1  # type: ignore[union-attr]
        sampler = _MaskSampler(masks, cells, float(p), seed, (h, w), x)

        # Class targets: each pass holds masks of one sample, chunked the same way for every
        # sample (a sample's map does not depend on its batch); a callable target: passes of
        # whole copies of the batch, mask-major.
        one_sample = resolved.fn is None
        samples = torch.arange(n, device=x.device)
        groups = [slice(i, i + 1) for i in range(n)] if one_sample else [slice(0, n)]
        # Out of memory: the sums start again with half the rows per pass.
        for plan in chunker.plans(1 if one_sample else n):
            with plan as most:
                chunk = even_chunks(masks, most) if one_sample else max(1, most // n)
                total: Tensor | None = None
                passes = -(-masks // chunk) * len(groups)
                with Progress(passes, "rise", enabled=progress) as bar:
                    for start in range(0, masks, chunk):
                        m = sampler.masks(start, min(masks, start + chunk))  # (m, H, W)
                        for group in groups:
                            ids = samples[group].repeat(m.shape[0])  # mask-major
                            images = (x[group][None] * m[:, None, None]).reshape(-1, *x.shape[1:])
                            part = _scores(fwd, resolved, images, ids).view(m.shape[0], -1, k)
                            if total is None:
                                total = part.new_zeros(n, k, h, w)
                            total[group] += torch.einsum("mnk,mhw->nkhw", part, m.to(part.dtype))
                            bar.update()
        with torch.inference_mode():
            clean = resolved.scores(output)  # type: ignore[arg-type]
        clean = clean.clone()
        assert total is not None
        maps = (total / (masks * float(p))).to(x.dtype)
        values = maps if multi else maps.expand(n, x.shape[1], h, w).contiguous()
        warn_zero_maps(
            "rise", values, "(every masked input scores zero: a zero probability or logit)"
        )
        return Attribution(
            values=values,
            target=resolved.classes,
            scores=clean,
            method="rise",
            output=output,
            extras={"masks": masks},
            reduction="none" if multi else "mean",
        )


class _MaskSampler:
    """RISE masks ``start .. stop`` of a fixed, seeded set, generated on demand.

    The low-resolution grids and the shifts of all ``N`` masks are drawn first (small), so
    that mask ``i`` is the same whatever the chunking; only the upsampling is done per chunk.
    """

    def __init__(
        self, count: int, cells: int, p: float, seed: int, size: tuple[int, int], like: Tensor
    ) -> None:
        h, w = size
        self.size = size
        self.cell = (math.ceil(h / cells), math.ceil(w / cells))
        self.up = ((cells + 1) * self.cell[0], (cells + 1) * self.cell[1])
        device = like.device
        gen = torch.Generator(device=device).manual_seed(seed)
        draws = torch.rand(count, 1, cells, cells, generator=gen, device=device)
        self.grid = (draws < p).to(like.dtype)
        self.shift_y = torch.randint(0, self.cell[0], (count,), generator=gen, device=device)
        self.shift_x = torch.randint(0, self.cell[1], (count,), generator=gen, device=device)
        self.dtype = like.dtype

    def masks(self, start: int, stop: int) -> Tensor:
        """Masks ``start .. stop - 1``: ``(stop - start, H, W)``, values in ``[0, 1]``."""
        h, w = self.size
        grid = self.grid[start:stop]
        up = F.interpolate(grid, size=self.up, mode="bilinear", align_corners=False)
        dev = up.device
        rows = self.shift_y[start:stop, None] + torch.arange(h, device=dev)  # (m, H)
        cols = self.shift_x[start:stop, None] + torch.arange(w, device=dev)  # (m, W)
        picked = torch.arange(stop - start, device=dev)[:, None, None]
        return up[:, 0][picked, rows[:, :, None], cols[:, None, :]]


def rise_masks(
    count: int, cells: int, p: float, seed: int, size: tuple[int, int], like: Tensor
) -> Tensor:
    """Return the ``(count, H, W)`` masks :func:`rise` draws with these settings."""
    return _MaskSampler(count, cells, p, seed, size, like).masks(0, count)
