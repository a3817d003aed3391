"""Small, shared renderings to images (matplotlib with the non-interactive Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def figure_to_array(figure) -> np.ndarray:
    """Render a matplotlib figure to ``uint8 [H, W, 3]`` and close it."""
    plt = _pyplot()
    figure.canvas.draw()
    rgba = np.asarray(figure.canvas.buffer_rgba())
    plt.close(figure)
    return rgba[:, :, :3].copy()


def heatmap(
    matrix,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str = "",
    cmap: str = "viridis",
    value_label: str = "",
) -> np.ndarray:
    """A labelled heat map (rows x columns) as an image."""
    plt = _pyplot()
    data = matrix.detach().cpu().numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix)
    height = max(2.5, 0.3 * len(row_labels) + 1.2)
    width = max(4.0, 0.45 * len(col_labels) + 2.5)
    fig, ax = plt.subplots(figsize=(width, height), dpi=90)
    im = ax.imshow(data, aspect="auto", cmap=cmap)
    ax.set_yticks(range(len(row_labels)), labels=list(row_labels), fontsize=8)
    ax.set_xticks(range(len(col_labels)), labels=list(col_labels), fontsize=8, rotation=45, ha="right")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=value_label)
    fig.tight_layout()
    return figure_to_array(fig)


def bar_chart(values: Sequence[float], labels: Sequence[str], title: str = "", ylabel: str = "") -> np.ndarray:
    """A labelled bar chart as an image."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(labels) + 2), 3.0), dpi=90)
    ax.bar(range(len(values)), list(values), color="#4C72B0")
    ax.set_xticks(range(len(labels)), labels=list(labels), rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return figure_to_array(fig)


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
