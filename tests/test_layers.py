"""Layer discovery that understands layouts: conv maps, token sequences, channels-last maps.

The models are written here, small and seeded: a ViT (convolutional patch embedding, class
token, optional register tokens, q/k/v projections with a per-head ``k_norm`` on
``(B, heads, T, head_dim)`` as in timm), a Swin-shaped channels-last network, a segmentation
network that upsamples its logits functionally, and a plain CNN.

*Planted dependence*: the planted variants compute every logit from the patches of one image
quadrant only (every other position is zeroed where it could carry information), so a CAM
read with the right layout must put its mass there. Two quadrants (top-left and top-right) and
a non-square input are used, so that a transposed grid or swapped height and width fail too.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import salience as sl
from salience import cli, layers
from salience._weak import ByIdentity
from salience.layers import find_layer, search_layers
from salience.layouts import Layout, check_reshape

CAM_METHODS = ["grad_cam", "grad_cam_plus_plus", "layer_cam", "score_cam"]
PATCH = 4
CLASSES = 5


def _run(method: str, model: nn.Module, x: Tensor, target: Any = 0, **kw: Any) -> sl.Attribution:
    if method == "score_cam":
        kw.setdefault("batch_size", 256)
    return sl.explain(model, x, method, target, **kw)


def _inputs(size: tuple[int, int], batch: int = 2, seed: int = 0) -> Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def _region(size: tuple[int, int], quadrant: str) -> Tensor:
    """The ``(H, W)`` boolean mask of an image quadrant: ``"top-left"`` or ``"top-right"``."""
    h, w = size
    mask = torch.zeros(h, w, dtype=torch.bool)
    if quadrant == "top-left":
        mask[: h // 2, : w // 2] = True
    else:
        mask[: h // 2, w // 2 :] = True
    return mask


def _keep(size: tuple[int, int], quadrant: str) -> Tensor:
    """The patches a planted model keeps: a ``(h, w)`` 0/1 mask inside the quadrant.

    The row and column of patches along the quadrant's inner borders are left out too: the
    bilinear upsampling of a CAM spreads each cell over half a cell around it.
    """
    h, w = size[0] // PATCH, size[1] // PATCH
    keep = _region((h, w), quadrant).float()
    keep[h // 2 - 1] = 0
    keep[:, w // 2 - 1 if quadrant == "top-left" else w // 2] = 0
    return keep


def _share(result: sl.Attribution, region: Tensor) -> Tensor:
    """The share of each map's positive mass inside ``region``."""
    mass = result.values[:, 0].clamp(min=0)
    total = mass.flatten(1).sum(1)
    assert (total > 0).all(), f"an empty map from {result.method} at {result.layer!r}"
    return (mass * region).flatten(1).sum(1) / total


class Mask(nn.Module):
    """Zero the grid positions outside ``keep`` ((h, w), 0/1) of a token or NHWC tensor."""

    def __init__(self, keep: Tensor, layout: str, special: int = 0) -> None:
        super().__init__()
        if layout == "nhwc":
            shaped = keep[None, :, :, None]
        else:  # tokens (N, special + h*w, C): special tokens are kept
            shaped = torch.cat([torch.ones(special), keep.flatten()])[None, :, None]
        self.register_buffer("mask", shaped)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mask


# -- a ViT -----------------------------------------------------------------------------------------


class Attention(nn.Module):
    """timm-style attention: q/k/v projections, a per-head ``k_norm`` on (B, heads, T, d)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.k_norm = nn.LayerNorm(self.head_dim)
        self.attn_drop = nn.Dropout(0.0)  # sees the (B, heads, T, T) attention weights
        self.proj = nn.Linear(dim, dim)

    def _split(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        k = self.k_norm(k)
        attn = self.attn_drop((q @ k.transpose(-2, -1) * self.head_dim**-0.5).softmax(dim=-1))
        return self.proj((attn @ v).transpose(1, 2).flatten(2))


class Block(nn.Module):
    """Pre-norm transformer block; ``keep`` masks the attention input (planted variants)."""

    def __init__(self, dim: int, heads: int, keep: Tensor | None, special: int) -> None:
        super().__init__()
        norm = nn.LayerNorm(dim)
        with torch.no_grad():
            norm.bias.add_(1.0)  # mostly positive features, so that every CAM has some mass
        self.norm1 = norm if keep is None else nn.Sequential(norm, Mask(keep, "tokens", special))
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A ViT: 4x4 conv patch embedding, class token and ``registers`` register tokens first.

    ``pool="cls"`` classifies the class token after the final ``norm`` (timm's default);
    ``"mean"`` averages the patch tokens. With ``keep`` (a patch-grid mask), the patch tokens
    outside it are zeroed after the embedding and at the input of every attention (and, for
    ``"mean"``, after the final norm, as ``plant``), so that every logit depends on the kept
    patches only, and the layer a CAM reads is zero outside them.
    """

    def __init__(
        self,
        size: tuple[int, int] = (32, 32),
        *,
        registers: int = 0,
        class_token: bool = True,
        pool: str = "cls",
        keep: Tensor | None = None,
        dim: int = 32,
        heads: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        grid = (size[0] // PATCH) * (size[1] // PATCH)
        self.special = int(class_token) + registers
        self.pool = pool
        self.patch_embed = nn.Conv2d(3, dim, PATCH, stride=PATCH)
        self.cls_token = nn.Parameter(torch.randn(1, int(class_token), dim))
        self.reg_token = nn.Parameter(torch.randn(1, registers, dim))
        self.pos_embed = nn.Parameter(0.5 * torch.randn(1, self.special + grid, dim))
        self.early = None if keep is None else Mask(keep, "tokens", self.special)
        self.blocks = nn.Sequential(*(Block(dim, heads, keep, self.special) for _ in range(2)))
        self.norm = nn.LayerNorm(dim)
        self.plant = None if keep is None or pool != "mean" else Mask(keep, "tokens", self.special)
        self.head = nn.Linear(dim, CLASSES)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        n = x.shape[0]
        x = torch.cat([self.cls_token.expand(n, -1, -1), self.reg_token.expand(n, -1, -1), x], 1)
        x = x + self.pos_embed
        if self.early is not None:
            x = self.early(x)
        x = self.norm(self.blocks(x))
        if self.plant is not None:
            x = self.plant(x)
        return self.head(x[:, 0] if self.pool == "cls" else x[:, self.special :].mean(1))


# -- a Swin-shaped channels-last network -----------------------------------------------------------


class PatchEmbed(nn.Module):
    """4x4 patch embedding to channels-last ``(N, h, w, C)``, as timm's Swin does."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, PATCH, stride=PATCH)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ChannelsLastBlock(nn.Module):
    """On ``(N, h, w, C)``: a depthwise 3x3 convolution (through ``permute``) and an MLP."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.dwconv(self.norm1(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(self.norm2(x))


class ChannelsLast(nn.Module):
    """Swin-shaped: every layer after the patch embedding keeps ``(N, h, w, C)``.

    The final ``norm`` outputs ``(N, h, w, C)``; the head averages over ``h, w``. With
    ``dim == h == w`` the shapes alone cannot tell channels-first from channels-last. With
    ``keep``, positions outside it are zeroed after the embedding and after ``norm``.
    """

    def __init__(
        self, dim: int = 16, *, keep: Tensor | None = None, seed: int = 0, shift: float = 1.0
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.patch_embed = PatchEmbed(dim)
        self.early = None if keep is None else Mask(keep, "nhwc")
        self.layers = nn.Sequential(ChannelsLastBlock(dim), ChannelsLastBlock(dim))
        self.norm = nn.LayerNorm(dim)
        with torch.no_grad():
            self.norm.bias.add_(shift)
        self.plant = None if keep is None else Mask(keep, "nhwc")
        self.head = nn.Linear(dim, CLASSES)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        if self.early is not None:
            x = self.early(x)
        x = self.norm(self.layers(x))
        if self.plant is not None:
            x = self.plant(x)
        return self.head(x.mean((1, 2)))


# -- a segmentation network and a plain CNN --------------------------------------------------------


class Segmenter(nn.Module):
    """Dense logits ``(N, 3, 8, 8)`` upsampled to the input with ``F.interpolate``."""

    def __init__(self, mode: str = "bilinear", align_corners: bool | None = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Conv2d(16, 3, 1)
        self.mode, self.align_corners = mode, align_corners
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        out = self.classifier(self.encoder(x))
        return F.interpolate(
            out, size=x.shape[-2:], mode=self.mode, align_corners=self.align_corners
        )


class TwoBranchSegmenter(nn.Module):
    """LRASPP's head: a 1x1 classifier of early features plus one of late features, resized.

    The head module returns the sum: it, and both classifiers, are the logit head; the late
    branch's last feature map (``late``) is the default layer. ``aux``: an auxiliary head on
    the early features computed after the main one and returned beside it (torchvision's
    FCN and DeepLabV3 with ``aux_loss=True``), a class map of the same shape.
    """

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.late = nn.Sequential(nn.Conv2d(16, 12, 3, padding=1), nn.ReLU())
            self.low_classifier = nn.Conv2d(8, 3, 1)
            self.high_classifier = nn.Conv2d(12, 3, 1)

        def forward(self, early: Tensor, late: Tensor) -> Tensor:
            up = F.interpolate(self.late(late), size=early.shape[-2:], mode="bilinear")
            return self.low_classifier(early) + self.high_classifier(up)

    def __init__(self, aux: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.early = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.deep = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = self.Head()
        # an auxiliary head with features of its own (torchvision's FCNHead), computed last
        self.aux = (
            nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 3, 1))
            if aux
            else None
        )
        self.eval()

    def forward(self, x: Tensor) -> Tensor | dict[str, Tensor]:
        early = self.early(x)
        out = F.interpolate(self.head(early, self.deep(early)), size=x.shape[-2:])
        if self.aux is None:
            return out
        return {"out": out, "aux": F.interpolate(self.aux(early), size=x.shape[-2:])}


class PlainCNN(nn.Module):
    """Conv / ReLU / pool with 8 channels on an 8x8 grid: (N, 8, 8, 8) fits both readings."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(8, CLASSES)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean((2, 3)))


# -- the default layer and its layout --------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "size", "layer", "layout"),
    [
        # class-token head: the final norm's patch tokens do not matter; the last attention
        # input (blocks[-1].norm1) is where they mix into the class token
        (lambda: ViT(), (32, 32), "blocks.1.norm1", "tokens 1+8x8"),
        (lambda: ViT(registers=4), (32, 32), "blocks.1.norm1", "tokens 5+8x8"),
        (lambda: ViT((32, 48)), (32, 48), "blocks.1.norm1", "tokens 1+8x12"),
        (lambda: ViT(pool="mean"), (32, 32), "norm", "tokens 1+8x8"),
        # no class token, 16 tokens: the (B, heads, 16, 16) attention weights fit a 16x16
        # input as a map by shape, and must not be taken for one
        (lambda: ViT((16, 16), class_token=False, pool="mean"), (16, 16), "norm", "tokens 4x4"),
        (lambda: ChannelsLast(), (32, 32), "norm", "NHWC"),
        (lambda: ChannelsLast(dim=8), (32, 32), "norm", "NHWC"),  # (N, 8, 8, 8)
        (lambda: Segmenter(), (32, 32), "encoder", "NCHW"),
        (lambda: Segmenter("nearest", None), (32, 32), "encoder", "NCHW"),
        (lambda: Segmenter("bilinear", True), (32, 32), "encoder", "NCHW"),
        (lambda: TwoBranchSegmenter(), (32, 32), "head.late", "NCHW"),
        (lambda: TwoBranchSegmenter(aux=True), (32, 32), "head.late", "NCHW"),
        (lambda: PlainCNN(), (32, 32), "features", "NCHW"),  # (N, 8, 8, 8) channels first
    ],
    ids=[
        "vit",
        "vit-registers",
        "vit-nonsquare",
        "vit-meanpool",
        "vit-no-class-token",
        "channels-last",
        "channels-last-square",
        "segmentation",
        "segmentation-nearest",
        "segmentation-corners",
        "segmentation-two-branches",
        "segmentation-two-branches-aux",
        "cnn",
    ],
)
def test_default_layer_and_layout(
    model: Any, size: tuple[int, int], layer: str, layout: str
) -> None:
    net = model()
    x = _inputs(size)
    target: Any = sl.mask_target(1) if isinstance(net, Segmenter | TwoBranchSegmenter) else 0
    if isinstance(net, TwoBranchSegmenter) and net.aux is not None:
        target = lambda out: out["out"][:, 1].sum((1, 2))  # noqa: E731
    for method in CAM_METHODS:
        a = _run(method, net, x, target)
        assert (a.layer, a.extras["layout"]) == (layer, layout), method
        assert a.values.shape == (2, 1, *size)
        assert torch.isfinite(a.values).all()


def test_attention_tensors_are_never_read_as_maps() -> None:
    """k_norm (B, heads, T, d) and the attention weights (B, heads, T, T) are no maps."""
    for net, size in [(ViT(), (32, 32)), (ViT((16, 16), class_token=False, pool="mean"), (16, 16))]:
        x = _inputs(size)
        with search_layers(net, x) as search:
            search.seed(x)
            net(x)
        inner = [e for e in search.entries if e.name.endswith(("k_norm", "attn_drop"))]
        assert len(inner) == 4  # two blocks, two 4-D attention tensors each
        assert all(search.layouts(e) == [] for e in inner)
        readable = [e.name for e in search.entries if search.layouts(e)]
        assert "blocks.1.norm1" in readable
        assert not any(name.endswith(("k_norm", "attn_drop")) for name in readable)


def test_explicit_k_norm_is_refused_with_a_hint() -> None:
    net, x = ViT(), _inputs((32, 32))
    for layer in ("blocks.1.attn.k_norm", "blocks.1.attn.attn_drop"):
        with pytest.raises(ValueError, match=r"not a spatial feature map.*attention tensor"):
            sl.grad_cam(net, x, 0, layer=layer)


class EarlySideHead(nn.Module):
    """LRASPP-like, with the early classifier computed first and a deep late branch after it:
    without gradients only the last few outputs are held, and the early classifier is not."""

    def __init__(self, depth: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.early = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.low_classifier = nn.Conv2d(8, 3, 1)
        pairs = [(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()) for _ in range(depth)]
        self.deep = nn.Sequential(*[m for pair in pairs for m in pair])
        self.late = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
        self.high_classifier = nn.Conv2d(12, 3, 1)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        early = self.early(x)
        low = self.low_classifier(early)
        high = self.high_classifier(self.late(self.deep(early)))
        return F.interpolate(low + high, size=x.shape[-2:], mode="bilinear")


@pytest.mark.parametrize("first", ["score_cam", "grad_cam"])
def test_every_method_passes_over_a_summed_head_whatever_was_called_first(first: str) -> None:
    net, x = EarlySideHead(), _inputs((32, 32))
    order = [first, *(m for m in ("score_cam", "grad_cam", "layer_cam") if m != first)]
    for method in order:
        assert _run(method, net, x, sl.mask_target(1)).layer == "late", method


class FaintFeatures(nn.Module):
    """Features with as many channels as classes, at the logits' size, and nearly zero (an
    untrained head's): the logits plus them are the logits within any tolerance."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.MaxPool2d(2))
        self.classifier = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.body[0].weight.mul_(1e-9)
            self.body[0].bias.zero_()
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(self.classifier(self.body(x)), size=x.shape[-2:], mode="bilinear")


def test_a_head_alone_is_no_sum_with_the_features_before_it() -> None:
    a = sl.grad_cam(FaintFeatures(), _inputs((16, 16)), sl.mask_target(1), relu=False)
    assert a.layer == "body"


class ChannelsLastSegmenter(nn.Module):
    """A ConvNeXt-style segmenter: blocks on (N, h, w, C) tensors whose grid height equals the
    class count (19 classes, a 19x19 grid)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.blocks = nn.Sequential(
            *[nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16)) for _ in range(3)]
        )
        self.classifier = nn.Conv2d(16, 19, 1)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        f = self.blocks(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return F.interpolate(self.classifier(f), size=x.shape[-2:], mode="bilinear")


def test_only_channels_first_maps_are_tried_as_logit_heads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A channels-last map whose grid height is the class count is no class map: not resized
    and compared with the output (six interpolations each)."""
    tried: list[tuple[int, ...]] = []
    resized = layers._is_resized_to

    def counted(t: Tensor, outputs: list[Tensor]) -> bool:
        tried.append(tuple(t.shape))
        return resized(t, outputs)

    monkeypatch.setattr(layers, "_is_resized_to", counted)
    a = sl.grad_cam(ChannelsLastSegmenter(), _inputs((76, 76)), sl.mask_target(1))
    assert (a.layer, a.extras["layout"]) == ("blocks", "NHWC")
    assert tried == [(2, 19, 19, 19)]  # the classifier only


def test_score_cam_picks_the_layer_grad_cam_picks_without_keeping_a_graph() -> None:
    """Score-CAM on a class-token ViT checks the patch tokens on one pass with gradients."""
    net, x = ViT(registers=2), _inputs((32, 32))
    a, b = sl.grad_cam(net, x, 0), sl.score_cam(net, x, 0)
    assert a.layer == b.layer == "blocks.1.norm1"
    assert a.extras["layout"] == b.extras["layout"] == "tokens 3+8x8"
    assert not b.values.requires_grad
    assert not b.extras["weights"].requires_grad


# -- planted dependence ----------------------------------------------------------------------------


def _detector(model: nn.Module) -> nn.Module:
    """Make class 0 a detector: positive head weights, so that its map is not empty by chance.

    On mostly positive features, Grad-CAM of a mean-pooling head is about the class's head row
    times the features: a row of negative sum would leave nothing after the ReLU.
    """
    with torch.no_grad():
        model.get_submodule("head").weight[0].abs_()
    return model


PLANTED = {
    "vit": lambda size, keep: _detector(ViT(size, keep=keep, seed=1)),
    "vit-registers": lambda size, keep: _detector(ViT(size, registers=4, keep=keep, seed=2)),
    "vit-meanpool": lambda size, keep: _detector(ViT(size, pool="mean", keep=keep, seed=3)),
    "channels-last": lambda size, keep: _detector(ChannelsLast(keep=keep, seed=4)),
    "channels-last-square": lambda size, keep: _detector(ChannelsLast(dim=8, keep=keep, seed=5)),
}


@pytest.mark.parametrize("quadrant", ["top-left", "top-right"])
@pytest.mark.parametrize("family", list(PLANTED))
@pytest.mark.parametrize("method", CAM_METHODS)
def test_planted_dependence_is_found(method: str, family: str, quadrant: str) -> None:
    """Every logit depends on one quadrant's patches: >= 90 % of the map mass is there."""
    size = (32, 48) if family.startswith("vit") and quadrant == "top-right" else (32, 32)
    net = PLANTED[family](size, _keep(size, quadrant))
    x = _inputs(size, seed=7)
    a = _run(method, net, x, 0)
    share = _share(a, _region(size, quadrant))
    assert (share >= 0.9).all(), (a.layer, a.extras["layout"], share.tolist())


def test_the_planted_models_depend_on_their_quadrant_only() -> None:
    """The premise of the planted tests: changing pixels outside the quadrant changes nothing."""
    for family, make in PLANTED.items():
        for quadrant in ("top-left", "top-right"):
            size = (32, 48) if family.startswith("vit") else (32, 32)
            net = make(size, _keep(size, quadrant))
            x = _inputs(size, seed=7)
            noise = _inputs(size, seed=8) * ~_region(size, quadrant)
            with torch.no_grad():
                torch.testing.assert_close(net(x + noise), net(x), msg=family)
                assert not torch.allclose(net(x * ~_region(size, quadrant)), net(x))


# -- ambiguous layouts -----------------------------------------------------------------------------


class Mixed(nn.Module):
    """Channels-first and channels-last layers, ending in an (N, 8, 8, 8) map of unknown layout.

    ``mix`` receives a tensor made by ``permute`` (nothing says where its channels are) and
    returns the same shape; both readings fit the 32x32 input, and the model computes
    channels-last tensors elsewhere (``norm``), so neither can be assumed.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, PATCH, stride=PATCH)
        self.norm = nn.LayerNorm(8)
        self.mix = Scale(8)
        self.fc = nn.Linear(8, CLASSES)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(self.stem(x).permute(0, 2, 3, 1))
        x = self.mix(x.permute(0, 3, 1, 2) + 0.5)
        return self.fc(x.mean((2, 3)))


class Scale(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, channels).view(channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


def test_an_ambiguous_layout_raises_with_layer_and_reshape() -> None:
    net, x = Mixed(), _inputs((32, 32))
    for method in CAM_METHODS:
        with pytest.raises(ValueError, match="cannot tell how to read layer 'mix'") as error:
            _run(method, net, x)
        message = str(error.value)
        assert "layer='mix', reshape=lambda t: t (channels first)" in message
        assert "layer='mix', reshape=lambda t: t.permute(0, 3, 1, 2) (channels last)" in message
        assert "'norm' (2, 8, 8, 8) as NHWC" in message  # the other candidates, named
    with pytest.raises(ValueError, match="cannot tell how to read layer 'mix'"):
        sl.grad_cam(net, x, layer="mix")  # an explicit layer is read the same way
    # the hint works as given
    a = sl.grad_cam(net, x, layer="mix", reshape=lambda t: t)
    assert (a.layer, a.extras["layout"]) == ("mix", "custom")


def test_tokens_that_fit_no_grid_raise_with_layer_and_reshape() -> None:
    """34 special tokens (more than 32): the sequence is no grid, and no early map is taken."""
    net, x = ViT(registers=33, pool="mean"), _inputs((32, 32))
    with pytest.raises(ValueError, match="cannot read the token sequences") as error:
        sl.grad_cam(net, x, 0)
    hint = "reshape=lambda t: t[:, 34:].unflatten(1, (8, 8)).permute(0, 3, 1, 2)"
    assert f"layer='norm', {hint}" in str(error.value)
    assert "layer='patch_embed'" in str(error.value)
    a = sl.grad_cam(
        net,
        x,
        0,
        layer="norm",
        reshape=lambda t: t[:, 34:].unflatten(1, (8, 8)).permute(0, 3, 1, 2),
    )
    assert a.extras["layout"] == "custom"
    with pytest.raises(
        ValueError, match=r"not a spatial feature map.*reshape=lambda t: t\[:, 34:\]"
    ):
        sl.grad_cam(net, x, 0, layer="norm")


@pytest.mark.parametrize("registers", [8, 16])
def test_many_register_tokens_are_read_by_the_patch_grid(registers: int) -> None:
    """A class token and 8 or 16 registers: the patch embedding's 8 x 8 grid says how many
    tokens are special (timm's ``reg_tokens=8`` was read as a 5 x 5 grid of rounded patches)."""
    net, x = ViT(registers=registers, pool="mean"), _inputs((32, 32))
    special = registers + 1
    a = sl.grad_cam(net, x, [0, 1], layer="norm")
    b = sl.grad_cam(
        net, x, [0, 1], layer="norm",
        reshape=lambda t: t[:, special:].unflatten(1, (8, 8)).permute(0, 3, 1, 2),
    )  # fmt: skip
    assert a.extras["layout"] == f"tokens {special}+8x8"
    torch.testing.assert_close(a.values, b.values)


class LinearPatches(nn.Module):
    """Patches of 16 embedded by ``nn.Linear`` (no convolution shows the grid), 4 register
    tokens first, a final ``norm``, the patch tokens averaged (timm's NaFlexViT ``gap``)."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(3 * 16 * 16, dim)
        self.reg_token = nn.Parameter(torch.randn(1, 4, dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, CLASSES)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        patches = F.unfold(x, 16, stride=16).transpose(1, 2)  # (N, h*w, 3*16*16)
        tokens = self.embed(patches)
        tokens = torch.cat([self.reg_token.expand(len(x), -1, -1), tokens], dim=1)
        return self.head(self.norm(tokens)[:, 4:].mean(1))


@pytest.mark.parametrize(("size", "grid"), [((64, 64), (4, 4)), ((64, 96), (4, 6))])
def test_tokens_without_a_seen_grid_take_whole_patches(size, grid) -> None:
    """20 tokens of a 64² input: 4 special + 4 x 4 patches of 16 (was 4 x 5 of no patch size);
    28 of a 64 x 96 input: 4 + 4 x 6 (was 4 x 7 of patches of 13, rounded down)."""
    net, x = LinearPatches(), _inputs(size)
    a = sl.grad_cam(net, x, [0, 1], layer="norm")
    b = sl.grad_cam(
        net, x, [0, 1], layer="norm",
        reshape=lambda t: t[:, 4:].unflatten(1, grid).permute(0, 3, 1, 2),
    )  # fmt: skip
    assert a.extras["layout"] == f"tokens 4+{grid[0]}x{grid[1]}"
    torch.testing.assert_close(a.values, b.values)


class ReducedKeys(nn.Module):
    """Twins-like: 4 x 4 patch tokens attend to keys from a 2 x 2 reduction of their map (a
    grid seen after the patch grid): 16 tokens are 4 x 4, not 12 special + 2 x 2."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.patch_embed = nn.Conv2d(3, dim, 16, stride=16)
        self.sr = nn.Conv2d(dim, dim, 2, stride=2)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, CLASSES)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        grid = self.patch_embed(x)
        tokens = grid.flatten(2).transpose(1, 2)  # (N, 16, C)
        keys = self.sr(grid).flatten(2).transpose(1, 2)  # (N, 4, C)
        mixed = tokens + (tokens @ keys.transpose(1, 2)).softmax(-1) @ keys
        return self.head(self.norm(mixed).mean(1))


def test_tokens_take_the_seen_grid_with_fewest_special_tokens() -> None:
    net, x = ReducedKeys(), _inputs((64, 64))
    a = sl.grad_cam(net, x, [0, 1], layer="norm")
    b = sl.grad_cam(
        net, x, [0, 1], layer="norm", reshape=lambda t: t.unflatten(1, (4, 4)).permute(0, 3, 1, 2)
    )
    assert a.extras["layout"] == "tokens 4x4"
    torch.testing.assert_close(a.values, b.values)


def test_patch_grids_and_fits() -> None:
    from salience.layouts import fits, patch_grid

    assert patch_grid(20, (64, 64)) is None  # 4 x 5 rounds one side down, the other up
    assert patch_grid(16, (64, 64), exact=True) == (4, 4)
    assert patch_grid(28, (64, 96), exact=True) is None
    assert patch_grid(28, (64, 96)) == (4, 7)  # patches of 13, rounded down: not exact
    assert patch_grid(24, (61, 83)) == (4, 6)  # padded up to whole patches of 16
    assert patch_grid(20, (61, 83)) == (4, 5)  # or rounded down (patches of 14)
    # an attention pool's (heads, queries) = (3, 1) is no grid of a square input
    assert not fits(3, 1, (64, 64))
    assert fits(7, 7, (224, 224))
    assert fits(2, 1, (64, 32))
    assert fits(4, 6, (61, 83))


# -- explicit layers and reshape= ------------------------------------------------------------------


@pytest.mark.parametrize("method", CAM_METHODS)
def test_explicit_channels_last_layer_is_read_channels_last(method: str) -> None:
    net, x = ChannelsLast(dim=8), _inputs((32, 32))
    a = _run(method, net, x, [1, 3], layer="layers.0")
    b = _run(method, net, x, [1, 3], layer="layers.0", reshape=lambda t: t.permute(0, 3, 1, 2))
    assert (a.layer, a.extras["layout"]) == ("layers.0", "NHWC")
    assert b.extras["layout"] == "custom"
    torch.testing.assert_close(a.values, b.values)


@pytest.mark.parametrize("method", CAM_METHODS)
def test_explicit_token_layer_equals_its_reshape(method: str) -> None:
    net, x = ViT(registers=4, pool="mean"), _inputs((32, 32))

    def grid(t: Tensor) -> Tensor:
        return t[:, 5:].unflatten(1, (8, 8)).permute(0, 3, 1, 2)

    a = _run(method, net, x, [1, 3], layer=net.blocks[1])
    b = _run(method, net, x, [1, 3], layer="blocks.1", reshape=grid)
    assert (a.layer, a.extras["layout"]) == ("blocks.1", "tokens 5+8x8")
    assert b.extras["layout"] == "custom"
    torch.testing.assert_close(a.values, b.values)


def test_layouts_are_pure_re_indexing() -> None:
    """The same conversion applies to the gradient: check_reshape accepts every layout."""
    cases = [
        (Layout("NCHW"), (2, 3, 4, 5)),
        (Layout("NHWC", (4, 5)), (2, 4, 5, 3)),
        (Layout("tokens", (4, 5), 2), (2, 22, 3)),
        (Layout("tokens", (4, 5)), (2, 20, 3)),
    ]
    for layout, shape in cases:
        t = torch.randn(shape)
        check_reshape(layout.to_map, t, "x")
        assert layout.to_map(t).shape == (2, 3, 4, 5)
        rebuilt = eval(layout.reshape_source())  # the hint shown in errors does the same
        torch.testing.assert_close(rebuilt(t), layout.to_map(t))
    assert str(Layout("tokens", (7, 7), 1)) == "tokens 1+7x7"


def test_a_cnn_keeps_its_layers() -> None:
    """Conv maps are read as they were: the layout is recorded, the values are unchanged."""
    net, x = PlainCNN(), _inputs((32, 32))
    a = sl.grad_cam(net, x, 2)
    b = sl.grad_cam(net, x, 2, layer="features", reshape=lambda t: t)
    torch.testing.assert_close(a.values, b.values)
    assert find_layer(net, "features")[0] == a.layer


def test_layers_by_name_down_the_dotted_path() -> None:
    """A name is looked up down its path; a second name of a shared module works as well, and
    an unknown name still gets the closest names."""
    net = PlainCNN()
    net.alias = net.features  # the same module under a second name
    assert find_layer(net, "features.0") == ("features.0", net.features[0])
    assert find_layer(net, "alias") == ("alias", net.features)
    a = sl.grad_cam(net, _inputs((32, 32)), 2, layer="alias")
    b = sl.grad_cam(net, _inputs((32, 32)), 2, layer="features")
    torch.testing.assert_close(a.values, b.values)
    with pytest.raises(ValueError, match="did you mean 'features'"):
        find_layer(net, "featurs")
    with pytest.raises(ValueError, match=r"no layer named 'features\.0\.weight'"):
        find_layer(net, "features.0.weight")  # a parameter, not a module


# -- what a search found is remembered -------------------------------------------------------------


@pytest.fixture
def hooked(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many modules each layer search hooks, call by call (the memory starts empty)."""
    counts: list[int] = []
    real = layers.forward_hooks

    def spy(modules: Any, hook: Any) -> Any:
        modules = list(modules)
        counts.append(len(modules))
        return real(modules, hook)

    monkeypatch.setattr(layers, "forward_hooks", spy)
    monkeypatch.setattr(layers, "_MEMO", ByIdentity())
    return counts


def _submodules(net: nn.Module) -> int:
    """How many modules a full search hooks: every named submodule."""
    return len([n for n, _ in net.named_modules() if n])


def _same(a: sl.Attribution, b: sl.Attribution) -> None:
    assert (a.layer, a.extras["layout"], a.extras["layer_calls"]) == (
        b.layer,
        b.extras["layout"],
        b.extras["layer_calls"],
    )
    torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", CAM_METHODS)
@pytest.mark.parametrize(
    ("model", "layer"),
    [
        (lambda: PlainCNN(), None),
        (lambda: ChannelsLast(), None),  # NHWC, remembered as such
        (lambda: ChannelsLast(), "layers.1"),  # a block: its type says no layout
        (lambda: ViT((16, 16), class_token=False, pool="mean"), None),  # tokens, none special
    ],
    ids=["cnn", "channels-last", "channels-last-block", "vit-no-class-token"],
)
def test_a_search_is_remembered_and_hooks_one_module_next_time(
    hooked: list[int], method: str, model: Any, layer: str | None
) -> None:
    """The second call hooks the layer the first one found, and explains the same map."""
    net = model()
    size = (16, 16) if isinstance(net, ViT) else (32, 32)
    x = _inputs(size)
    first = _run(method, net, x, 1, layer=layer)
    second = _run(method, net, x, 1, layer=layer)
    modules = _submodules(net)
    assert (hooked[0], hooked[-1]) == (modules, 1)
    _same(first, second)
    _same(second, _run(method, model(), x, 1, layer=layer))  # a fresh model: a full search


def test_what_is_not_remembered(hooked: list[int]) -> None:
    """Special tokens (the choice reads gradients), extra forward arguments (they may change
    what the model computes) and a conv layer (hooked alone anyway) search every time."""
    vit, x = ViT(), _inputs((32, 32))
    for _ in range(2):
        assert sl.grad_cam(vit, x, 1).layer == "blocks.1.norm1"
    modules = _submodules(vit)
    assert hooked == [modules, modules]

    class Extra(PlainCNN):
        def forward(self, x: Tensor, scale: Tensor) -> Tensor:  # type: ignore[override]
            return super().forward(x) * scale

    hooked.clear()
    net, x = Extra(), _inputs((32, 32))
    for _ in range(2):
        sl.grad_cam(net, x, 1, forward_args=(torch.tensor(2.0),))
    assert hooked[0] == hooked[1] > 1
    hooked.clear()
    for _ in range(2):
        sl.grad_cam(PlainCNN(), x, 1, layer="features.3")
    assert hooked == [1, 1]


class Routed(nn.Module):
    """Two stages, two heads; ``route`` (no module) decides what the logits read:
    ``"b"`` the second stage, ``"a"`` the first (the second still runs, unread), ``"skip"`` the
    first (the second never runs), ``"strided"`` the second on a pooled first stage."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())
        self.head_a, self.head_b = nn.Linear(4, CLASSES), nn.Linear(6, CLASSES)
        self.route = "b"

    def forward(self, x: Tensor) -> Tensor:
        a = self.a(x)
        if self.route == "skip":
            return self.head_a(a.mean((2, 3)))
        b = self.b(F.max_pool2d(a, 2) if self.route == "strided" else a)
        if self.route == "a":
            return self.head_a(a.mean((2, 3)))
        return self.head_b(b.mean((2, 3)))


@pytest.mark.parametrize("route", ["a", "skip", "strided"])
def test_a_remembered_layer_that_no_longer_holds_is_searched_again(
    hooked: list[int], route: str
) -> None:
    """Where the model takes another path than when the layer was found (the layer unread,
    not run, or of another shape), the call searches again and explains what a fresh search
    does, without an error."""
    net, x = Routed(), _inputs((32, 32))
    assert sl.grad_cam(net, x, 1).layer == "b"
    fresh = Routed()
    fresh.route = net.route = route
    expected = sl.grad_cam(fresh, x, 1)
    hooked.clear()
    again = sl.grad_cam(net, x, 1)
    _same(again, expected)
    assert again.layer == ("b" if route == "strided" else "a")
    modules = _submodules(net)
    assert hooked == [1, modules]  # the remembered layer, then a full search
    sl.grad_cam(net, x, 1)
    # what the new search found is remembered in turn, unless the choice passed over a layer
    # the score does not reach (which may depend on the target)
    assert hooked[-1] == (modules if route == "a" else 1)


def test_a_layer_remembered_without_gradients_is_checked_with_them(hooked: list[int]) -> None:
    """Score-CAM chooses without a graph (the last map, read or not); Grad-CAM then checks
    that its score reaches what was remembered, and searches again where it does not."""
    net, x = Routed(), _inputs((32, 32))
    net.route = "a"  # the second stage runs, unread
    assert sl.score_cam(net, x, 1, batch_size=64).layer == "b"
    fresh = Routed()
    fresh.route = "a"
    _same(sl.grad_cam(net, x, 1), sl.grad_cam(fresh, x, 1))
    assert sl.grad_cam(net, x, 1).layer == "a"


def test_a_replaced_module_another_input_shape_or_mode_searches_again(hooked: list[int]) -> None:
    net, x = PlainCNN(), _inputs((32, 32))
    sl.grad_cam(net, x, 1)
    net.features[4] = nn.Tanh()  # a module replaced: every module is searched again
    _same(sl.grad_cam(net, x, 1), sl.grad_cam(_with_tanh(PlainCNN()), x, 1))
    modules = _submodules(net)
    assert hooked[:2] == [modules, modules]
    sl.grad_cam(net, _inputs((48, 32)))
    assert hooked[-1] == modules  # another input shape
    sl.grad_cam(net, _inputs((48, 32)))
    assert hooked[-1] == 1
    net.fc.train()  # a module in training mode (a model may take another path then)
    sl.grad_cam(net, _inputs((48, 32)))
    assert hooked[-1] == modules


def _with_tanh(net: PlainCNN) -> PlainCNN:
    net.features[4] = nn.Tanh()
    return net


# -- the command line prints the layer and its layout ----------------------------------------------


@pytest.mark.filterwarnings("ignore:unpickling:UserWarning")
def test_cli_prints_layer_and_layout(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    path = tmp_path / "vit.pt"
    torch.save(ViT((16, 16), registers=1), path)
    image = tmp_path / "x.png"
    Image.new("RGB", (20, 20), (120, 30, 200)).save(image)
    argv = ["explain", str(image), "-m", "grad_cam", "-o", str(tmp_path / "out"), "-q"]
    argv += ["--model", str(path), "--trust-model", "--input-size", "16", "--resize", "16"]
    code = cli.main(argv)
    out = capsys.readouterr().out
    assert code == cli.EXIT_OK
    assert "layer blocks.1.norm1 (tokens 2+4x4)" in out
