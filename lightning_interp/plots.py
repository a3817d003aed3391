"""Small, shared renderings to images, drawn with PIL (milliseconds each; no plotting library needed)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def figure_to_array(figure) -> np.ndarray:
    """Render a matplotlib figure (the user's; the plugin itself draws with PIL) to ``uint8 [H, W, 3]``, closed."""
    import matplotlib.pyplot as plt

    figure.canvas.draw()
    rgba = np.asarray(figure.canvas.buffer_rgba())
    plt.close(figure)
    return rgba[:, :, :3].copy()


#: Colour maps as evenly spaced anchors (sampled from matplotlib's of the same name), interpolated linearly.
COLORMAPS = {
    "viridis": ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58",
                "#b5de2b", "#fde725"],
    "RdBu_r": ["#053061", "#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7", "#fddbc7", "#f4a582",
               "#d6604d", "#b2182b", "#67001f"],
}
#: Colour maps whose middle is zero: their limits are made symmetric.
DIVERGING = {"RdBu_r"}


def colorize(values: np.ndarray, cmap: str, low: float, high: float) -> np.ndarray:
    """``uint8 [..., 3]`` colours of ``values`` on ``cmap`` between ``low`` and ``high``; NaN is grey."""
    if cmap not in COLORMAPS:
        raise ValueError(f"cmap must be one of {sorted(COLORMAPS)}, got {cmap!r}")
    anchors = np.array([[int(h[i : i + 2], 16) for i in (1, 3, 5)] for h in COLORMAPS[cmap]], dtype=np.float64)
    t = np.clip((values - low) / (high - low if high > low else 1.0), 0.0, 1.0) * (len(anchors) - 1)
    t = np.nan_to_num(t)
    lower = np.minimum(np.floor(t).astype(int), len(anchors) - 2)
    frac = (t - lower)[..., None]
    rgb = anchors[lower] * (1 - frac) + anchors[lower + 1] * frac
    rgb[np.isnan(values)] = 160
    return rgb.round().astype(np.uint8)


def heatmap(
    matrix,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str = "",
    cmap: str = "viridis",
    value_label: str = "",
    cell: tuple[int, int] = (30, 18),
) -> np.ndarray:
    """A labelled heat map (rows x columns) with a colour bar, as a ``uint8 [H, W, 3]`` image.

    Drawn with PIL in a few milliseconds (a matplotlib figure took 0.1-0.3 s, which mattered at the end of
    short runs). Diverging maps (``"RdBu_r"``) are centred on zero; NaN cells are grey.
    """
    from PIL import Image, ImageDraw, ImageFont

    data = matrix.detach().cpu().double().numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix, float)
    finite = data[np.isfinite(data)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if cmap in DIVERGING:
        high = max(abs(low), abs(high))
        low = -high
    font = ImageFont.load_default()
    text_w = lambda text: int(np.ceil(font.getlength(text)))  # noqa: E731  (Pillow's default font is proportional)
    _, top_, _, bottom_ = font.getbbox("Ag[]|")
    line_h, pad = bottom_ - min(top_, 0) + 1, 6
    cell_w, cell_h = cell
    cell_h = max(cell_h, line_h + 2)
    rows, cols = data.shape
    left = pad + max((text_w(r) for r in row_labels), default=0) + 4
    top = pad + (line_h + 4 if title else 0)
    label_h = max((text_w(c) for c in col_labels), default=0) + 4
    cell_w = max(cell_w, line_h + 2)  # column labels are written vertically, one line wide
    bar_x = left + cols * cell_w + 12
    value_w = max(text_w(f"{low:.3g}"), text_w(f"{high:.3g}")) + 6
    width = max(bar_x + 12 + 4 + value_w + (line_h + 4 if value_label else 0) + pad, pad + text_w(title) + pad)
    bar_h = max(rows * cell_h, 120, text_w(value_label) if value_label else 0)
    height = max(top + rows * cell_h + label_h + pad, top + bar_h + pad)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, pad), title, fill="black", font=font)

    cells = np.kron(colorize(data, cmap, low, high), np.ones((cell_h, cell_w, 1), dtype=np.uint8))
    canvas.paste(Image.fromarray(cells), (left, top))
    for i, label in enumerate(row_labels):
        draw.text((left - 4 - text_w(label), top + i * cell_h + (cell_h - line_h) // 2), label, fill="black", font=font)
    for j, label in enumerate(col_labels):
        text = _rotated_text(label, font, text_w(label), line_h)
        canvas.paste(text, (left + j * cell_w + (cell_w - line_h) // 2, top + rows * cell_h + 3))

    ramp = colorize(np.linspace(high, low, bar_h)[:, None].repeat(12, axis=1), cmap, low, high)
    canvas.paste(Image.fromarray(ramp), (bar_x, top))
    draw.text((bar_x + 16, top), f"{high:.3g}", fill="black", font=font)
    draw.text((bar_x + 16, top + bar_h - line_h), f"{low:.3g}", fill="black", font=font)
    if value_label:
        canvas.paste(_rotated_text(value_label, font, text_w(value_label), line_h), (bar_x + 16 + value_w, top))
    return np.asarray(canvas)


def _rotated_text(text: str, font, text_w: int, line_h: int):
    """``text`` drawn top to bottom (rotated a quarter turn), as a PIL image."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (max(1, text_w + 2), line_h), "white")
    ImageDraw.Draw(strip).text((0, 0), text, fill="black", font=font)
    return strip.rotate(-90, expand=True)


def looks_like_images(x: torch.Tensor) -> bool:
    """True for ``[N, C, H, W]`` inputs with 1, 3 or 4 channels."""
    return x.dim() == 4 and x.shape[1] in (1, 3, 4) and min(x.shape[2:]) >= 4


def image_gallery(
    images: torch.Tensor, captions: Sequence[str], columns: int = 8, title: str = "", cell: int = 96
) -> np.ndarray:
    """A grid of ``[N, C, H, W]`` images (each min-max scaled, enlarged to ``cell`` pixels) with a caption under
    each, drawn with PIL: a few milliseconds where a matplotlib grid takes a few hundred."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    n = len(images)
    columns = max(1, min(columns, n))
    rows = int(np.ceil(n / columns))
    lines = max((c.count("\n") + 1 for c in captions), default=1)
    caption_h, title_h, pad = 12 * lines + 2, (16 if title else 0), 4
    canvas = Image.new("RGB", (columns * (cell + pad) + pad, title_h + rows * (cell + caption_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 2), title, fill="black", font=font)
    for i, (img, caption) in enumerate(zip(images, captions)):
        arr = img.detach().cpu().float()
        arr = (arr - arr.min()) / (arr.max() - arr.min()).clamp_min(1e-12)
        arr = (arr.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        tile = Image.fromarray(arr[:, :, 0] if arr.shape[-1] == 1 else arr[:, :, :3]).convert("RGB")
        tile = tile.resize((cell, cell), Image.NEAREST)
        x = pad + (i % columns) * (cell + pad)
        y = title_h + pad + (i // columns) * (cell + caption_h + pad)
        canvas.paste(tile, (x, y))
        draw.multiline_text((x, y + cell + 1), caption, fill="black", font=font, spacing=1)
    return np.asarray(canvas)
