"""The pictures of an evaluation, drawn with Pillow (no plotting library needed): the trade-off plot of a sweep
(an editing metric against a preservation metric, one line per method, like the iCD paper's Figure 9) and the
contact sheet of the best and worst items."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from icd.files import atomic_write

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
PLOT_SIZE, MARGINS = (900, 620), (80, 60, 260, 70)  # left, top, right, bottom
THUMB_HEIGHT, CAPTION_WIDTH = 160, 520
TICKS = 6  # on each axis of a plot


@dataclass
class Series:
    name: str
    points: list[tuple[float, float, str]]  # x, y, the label of the point (the swept value)
    colour: int = 0  # index into COLOURS
    marker: int = 0  # 0 circle, 1 square, 2 triangle, 3 diamond


def _font(size: int):
    return ImageFont.load_default(size=size)


def nice_ticks(low: float, high: float) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart, about TICKS of them) covering [low, high]."""
    if high <= low:
        low, high = low - 0.5, high + 0.5
    rough = (high - low) / TICKS
    magnitude = 10 ** math.floor(math.log10(rough))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= rough)
    first = math.floor(low / step) * step
    return [round(first + i * step, 10) for i in range(int(math.ceil((high - first) / step)) + 1)]


def _save(picture: Image.Image, path: Path) -> None:
    atomic_write(path, lambda temporary: picture.save(temporary, format="PNG"), overwrite=True)


def _axes(pen: ImageDraw.ImageDraw, xs: list[float], ys: list[float], labels: tuple[str, str]):
    """Grid, ticks and labels; returns the function that maps a data point to pixels."""
    left, top, right, bottom = MARGINS
    width, height = PLOT_SIZE[0] - left - right, PLOT_SIZE[1] - top - bottom
    x_ticks, y_ticks = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))

    def to_pixels(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_ticks[0]) / (x_ticks[-1] - x_ticks[0]) * width,
                top + height - (y - y_ticks[0]) / (y_ticks[-1] - y_ticks[0]) * height)

    font = _font(13)
    for x in x_ticks:
        px, _ = to_pixels(x, y_ticks[0])
        pen.line([(px, top), (px, top + height)], fill="#e6e6e6")
        pen.text((px, top + height + 6), f"{x:g}", fill="black", font=font, anchor="mt")
    for y in y_ticks:
        _, py = to_pixels(x_ticks[0], y)
        pen.line([(left, py), (left + width, py)], fill="#e6e6e6")
        pen.text((left - 6, py), f"{y:g}", fill="black", font=font, anchor="rm")
    pen.rectangle([left, top, left + width, top + height], outline="black")
    pen.text((left + width / 2, PLOT_SIZE[1] - 18), labels[0], fill="black", font=_font(15), anchor="mm")
    pen.text((12, top - 16), labels[1], fill="black", font=_font(15), anchor="lm")
    return to_pixels


def _marker(pen: ImageDraw.ImageDraw, x: float, y: float, shape: int, colour: str, size: float = 4.5) -> None:
    if shape % 4 == 0:
        pen.ellipse([x - size, y - size, x + size, y + size], fill=colour)
    elif shape % 4 == 1:
        pen.rectangle([x - size, y - size, x + size, y + size], fill=colour)
    elif shape % 4 == 2:
        pen.polygon([(x, y - size - 1), (x + size + 1, y + size), (x - size - 1, y + size)], fill=colour)
    else:
        pen.polygon([(x, y - size - 1), (x + size + 1, y), (x, y + size + 1), (x - size - 1, y)], fill=colour)


def tradeoff_plot(series: list[Series], x_label: str, y_label: str, title: str, path: Path) -> None:
    """One line per series through its points (in the order given), each point labelled; a series' colour and
    marker as it says (e.g. the colour for the method, the marker for the solver)."""
    canvas = Image.new("RGB", PLOT_SIZE, "white")
    pen = ImageDraw.Draw(canvas)
    points = [point for line in series for point in line.points]
    to_pixels = _axes(pen, [p[0] for p in points], [p[1] for p in points], (x_label, y_label))
    small, legend_x = _font(11), PLOT_SIZE[0] - MARGINS[2] + 16
    for number, line in enumerate(series):
        colour = COLOURS[line.colour % len(COLOURS)]
        pixels = [to_pixels(x, y) for x, y, _ in line.points]
        if len(pixels) > 1:
            pen.line(pixels, fill=colour, width=2)
        for (px, py), (_, _, label) in zip(pixels, line.points):
            _marker(pen, px, py, line.marker, colour)
            pen.text((px + 7, py - 5), label, fill=colour, font=small, anchor="ls")
        legend_y = MARGINS[1] + 20 * number
        pen.line([(legend_x, legend_y), (legend_x + 24, legend_y)], fill=colour, width=3)
        _marker(pen, legend_x + 12, legend_y, line.marker, colour)
        pen.text((legend_x + 30, legend_y), line.name[:36], fill="black", font=_font(12), anchor="lm")
    pen.text((MARGINS[0], 14), title, fill="black", font=_font(13), anchor="lm")
    _save(canvas, path)


def _thumb(image: Image.Image) -> Image.Image:
    """At THUMB_HEIGHT: small images enlarged with nearest neighbours (their pixels stay visible)."""
    width = max(1, round(image.width * THUMB_HEIGHT / image.height))
    resample = Image.Resampling.NEAREST if image.height < THUMB_HEIGHT else Image.Resampling.LANCZOS
    return image.convert("RGB").resize((width, THUMB_HEIGHT), resample)


def _wrapped(text: str, font, width: int, pen: ImageDraw.ImageDraw) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and pen.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return [*lines, line] if line else lines


def contact_sheet(sections: list[tuple[str, list[tuple[Image.Image, Image.Image, str]]]], path: Path) -> None:
    """Sections (a heading and rows of source, edit and caption), one row per item, source | edit | caption."""
    rows = [(heading, [(_thumb(a), _thumb(b), caption) for a, b, caption in entries]) for heading, entries in sections]
    width = max([a.width + b.width for _, entries in rows for a, b, _ in entries] + [0]) + CAPTION_WIDTH + 24
    height = sum(36 + len(entries) * (THUMB_HEIGHT + 8) for _, entries in rows)
    canvas = Image.new("RGB", (width, max(height, 1)), "white")
    pen, font, y = ImageDraw.Draw(canvas), _font(13), 0
    for heading, entries in rows:
        pen.text((8, y + 18), heading, fill="black", font=_font(16), anchor="lm")
        y += 36
        for source, edit, caption in entries:
            canvas.paste(source, (8, y))
            canvas.paste(edit, (8 + source.width, y))
            text_x = 16 + source.width + edit.width
            for number, line in enumerate(_wrapped(caption, font, CAPTION_WIDTH - 8, pen)[:9]):
                pen.text((text_x, y + 4 + 17 * number), line, fill="black", font=font)
            y += THUMB_HEIGHT + 8
    _save(canvas, path)
