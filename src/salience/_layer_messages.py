"""What the errors of the layer search say: why an output is no map, and what to pass instead.

A mixin of :class:`salience.layers.LayerSearch`: every message names the layer, its output
shape and the input size, and shows the ``layer=`` and ``reshape=`` that would read it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .layouts import MAX_SPECIAL_TOKENS, Layout

if TYPE_CHECKING:
    from .layers import _Entry


class _LayerMessages:
    size: tuple[int, int]
    entries: list[_Entry]

    if TYPE_CHECKING:

        def _tokens(self, count: int, grids: int, most: int = ...) -> Layout | None: ...

    def _size_text(self) -> str:
        return f"{self.size[0]}x{self.size[1]}"

    def _why_not(self, e: _Entry) -> str:
        shape = e.shape
        if len(shape) == 3:
            if e.cell.axis == "first":
                return "it is a channels-first sequence (N, C, L) of a 1-D layer"
            return (
                f"{shape[1]} tokens are no grid of h*w patches of the input after at most "
                f"{MAX_SPECIAL_TOKENS} leading special tokens"
            )
        _, d1, d2, d3 = shape
        if e.attention_like:
            return (
                "an axis holds the token count of the model's token sequences: it is an "
                "attention tensor (N, heads, tokens, ...), not a map"
            )
        if e.cell.axis == "last":
            return (
                f"its last axis holds features (it comes from a Linear or LayerNorm layer) and "
                f"({d1}, {d2}) is no grid of the input: an attention tensor (N, heads, tokens, "
                "head_dim)?"
            )
        return f"neither ({d2}, {d3}) nor ({d1}, {d2}) is a grid of the input"

    def _hints(self, e: _Entry) -> str:
        """``layer=..., reshape=...`` for each way ``e`` could be read, as source text."""
        shape = e.shape
        if len(shape) == 4:
            ways = [("channels first", "lambda t: t")]
            ways.append(("channels last", Layout("NHWC").reshape_source()))
        else:
            # the reading of the layer, or one with more special tokens than it takes
            layout = self._tokens(shape[1], e.grids, most=2 * MAX_SPECIAL_TOKENS)
            source = (
                layout.reshape_source()
                if layout is not None
                else "lambda t: t[:, S:].unflatten(1, (h, w)).permute(0, 3, 1, 2) with S "
                f"leading special tokens and h * w = {shape[1]} - S"
            )
            ways = [("tokens", source)]
        return " or ".join(f"layer={e.name!r}, reshape={code} ({what})" for what, code in ways)

    def _listing(self, pool: list[tuple[_Entry, list[Layout]]]) -> str:
        shown = []
        for entry, layouts in pool[:6]:
            how = " or ".join(str(layout) for layout in layouts)
            shown.append(f"{entry.name!r} {entry.shape} as {how}")
        more = f" and {len(pool) - 6} more" if len(pool) > 6 else ""
        return ", ".join(shown) + more

    def _ambiguous(self, e: _Entry, pool: list[tuple[_Entry, list[Layout]]]) -> str:
        _, d1, d2, d3 = e.shape
        text = (
            f"cannot tell how to read layer {e.name!r} as a spatial map: its output {e.shape} "
            f"fits the {self._size_text()} input both as (N, C, h, w) with a {d2}x{d3} grid "
            f"and as channels-last (N, h, w, C) with a {d1}x{d2} grid, nothing in the model "
            "says which axis holds the channels, and the model computes channels-last or "
            f"token layers. Say which with layer= and reshape=: {self._hints(e)}"
        )
        if len(pool) > 1:
            text += f". Layers read before it, from the last: {self._listing(pool[1:])}"
        return text

    def _unread_tokens(self, e: _Entry, chosen: _Entry, layout: Layout) -> str:
        return (
            f"cannot read the token sequences of this model as a grid of the "
            f"{self._size_text()} input: layer {e.name!r} outputs {e.shape}, and "
            f"{self._why_not(e)}. The last layer that can be read is {chosen.name!r} "
            f"{chosen.shape} as {layout}, before them and far from the prediction. Pass layer= "
            f"and reshape= for the tokens, e.g. {self._hints(e)}; or layer={chosen.name!r} "
            "to explain that layer"
        )

    def _nothing_readable(self) -> str:
        seen = self.entries[::-1]
        text = (
            "found no layer whose output is a spatial feature map of the "
            f"{self._size_text()} input: a map (N, K, h, w) with h * w > 1, a channels-last map "
            "(N, h, w, C), or a token sequence (N, s + h*w, C) with at most "
            f"{MAX_SPECIAL_TOKENS} leading special tokens; pass layer= (a module of the model "
            "or its dotted name), and reshape= for layers whose output is not (N, K, h, w)"
        )
        if seen:
            listed = ", ".join(f"{e.name!r} {e.shape}" for e in seen[:6])
            text += f". The last 3-D and 4-D outputs: {listed}; e.g. {self._hints(seen[0])}"
        return text
