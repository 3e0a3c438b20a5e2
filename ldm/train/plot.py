"""Training curve as a PNG drawn with Pillow alone (no plotting dependency): loss per step, its smoothed trend, the
held-out validation loss where measured and the learning rate on a second axis, with labelled axes, ticks and a
legend."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ldm.atomic import save_image

WIDTH, HEIGHT = 800, 450
LEFT, RIGHT, TOP, BOTTOM = 78, 84, 34, 52
RAW, SMOOTH, LR, GRID, INK = (150, 185, 235), (20, 70, 170), (225, 120, 20), (225, 225, 225), (0, 0, 0)
VAL = (200, 30, 60)


def nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """About ``count`` round tick values (1/2/5 x 10^k steps) covering [lo, hi]."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, value = [], first
    while value <= hi + step * 1e-9:
        ticks.append(0.0 if abs(value) < step * 1e-9 else value)
        value += step
    return ticks


def smooth(values: np.ndarray, weight: float = 0.9) -> np.ndarray:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing slider)."""
    out = np.empty_like(values, dtype=np.float64)
    avg = 0.0
    for i, v in enumerate(values):
        avg = weight * avg + (1 - weight) * v
        out[i] = avg / (1 - weight ** (i + 1))
    return out


def _label(value: float) -> str:
    return f"{value:.0e}" if value and (abs(value) < 1e-3 or abs(value) >= 1e5) else f"{value:g}"


def _vertical_text(img, text: str, x: int, y_center: int, font, fill) -> None:
    from PIL import Image, ImageDraw

    box = ImageDraw.Draw(img).textbbox((0, 0), text, font=font)
    tile = Image.new("RGBA", (box[2] + 2, box[3] + 2), (255, 255, 255, 0))
    ImageDraw.Draw(tile).text((1, 1), text, font=font, fill=fill)
    tile = tile.rotate(90, expand=True)
    img.paste(tile, (x, y_center - tile.height // 2), tile)


def draw_training_plot(
    steps, losses, lrs, path: str | Path, title: str = "training loss", val_steps=(), val_losses=()
) -> None:
    """Write the chart to ``path`` atomically; ``lrs`` may be empty (then no learning-rate axis), ``val_steps`` /
    ``val_losses`` too (then no validation curve)."""
    from PIL import Image, ImageDraw, ImageFont

    steps = np.asarray(steps, np.float64)
    losses = np.asarray(losses, np.float64)
    lrs = np.asarray(lrs, np.float64)
    val_steps = np.asarray(val_steps, np.float64)
    val_losses = np.asarray(val_losses, np.float64)
    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, TOP, HEIGHT - BOTTOM
    draw.text((x0, 10), title, font=font, fill=INK)
    finite = np.isfinite(losses)
    val_finite = np.isfinite(val_losses)
    if finite.sum() >= 1:
        all_steps = np.concatenate([steps, val_steps])
        s_lo, s_hi = float(all_steps.min()), float(max(all_steps.max(), all_steps.min() + 1))
        shown = np.concatenate([losses[finite], val_losses[val_finite]])
        l_lo, l_hi = float(shown.min()), float(shown.max())
        pad = 0.05 * ((l_hi - l_lo) or abs(l_hi) or 1.0)
        l_lo, l_hi = l_lo - pad, l_hi + pad

        def px(s):
            return x0 + (np.asarray(s) - s_lo) / (s_hi - s_lo) * (x1 - x0)

        def py(v, lo=l_lo, hi=l_hi):
            return y1 - (np.asarray(v) - lo) / (hi - lo) * (y1 - y0)

        for tick in nice_ticks(s_lo, s_hi):
            x = float(px(tick))
            draw.line([(x, y0), (x, y1)], fill=GRID)
            draw.line([(x, y1), (x, y1 + 4)], fill=INK)
            draw.text((x, y1 + 6), f"{tick:g}", font=font, fill=INK, anchor="ma")
        for tick in nice_ticks(l_lo, l_hi):
            y = float(py(tick))
            draw.line([(x0, y), (x1, y)], fill=GRID)
            draw.line([(x0 - 4, y), (x0, y)], fill=INK)
            draw.text((x0 - 6, y), _label(tick), font=font, fill=INK, anchor="rm")
        xs, ys = px(steps[finite]), py(losses[finite])
        if len(xs) > 1:
            draw.line(list(zip(xs.tolist(), ys.tolist())), fill=RAW, width=1)
            draw.line(list(zip(xs.tolist(), py(smooth(losses[finite])).tolist())), fill=SMOOTH, width=3)
        else:
            draw.ellipse([xs[0] - 3, ys[0] - 3, xs[0] + 3, ys[0] + 3], fill=SMOOTH)
        vx, vy = px(val_steps[val_finite]).tolist(), py(val_losses[val_finite]).tolist()
        if len(vx) > 1:
            draw.line(list(zip(vx, vy)), fill=VAL, width=2)
        for x, y in zip(vx, vy):
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=VAL)
        if lrs.size == steps.size and lrs.size and np.isfinite(lrs).all():
            r_lo, r_hi = 0.0, float(lrs.max()) * 1.05 or 1.0
            for tick in nice_ticks(r_lo, r_hi, 5):
                y = float(py(tick, r_lo, r_hi))
                draw.line([(x1, y), (x1 + 4, y)], fill=LR)
                draw.text((x1 + 6, y), _label(tick), font=font, fill=LR, anchor="lm")
            lr_line = list(zip(px(steps).tolist(), py(lrs, r_lo, r_hi).tolist()))
            draw.line(lr_line, fill=LR, width=2) if len(lr_line) > 1 else None
            _vertical_text(img, "learning rate", WIDTH - 22, (y0 + y1) // 2, font, LR)
    draw.rectangle([x0, y0, x1, y1], outline=INK)
    draw.text(((x0 + x1) // 2, HEIGHT - 18), "step", font=font, fill=INK, anchor="ma")
    _vertical_text(img, "loss", 6, (y0 + y1) // 2, font, INK)
    legend = [("loss", RAW), ("smoothed loss (EMA 0.9)", SMOOTH)]
    legend += [("validation loss (held out)", VAL)] if val_losses.size else []
    legend += [("learning rate", LR)] if lrs.size else []
    lx = x1 - 170
    for i, (name, colour) in enumerate(legend):
        y = y0 + 10 + 14 * i
        draw.line([(lx, y), (lx + 18, y)], fill=colour, width=3)
        draw.text((lx + 24, y), name, font=font, fill=INK, anchor="lm")
    save_image(path, img)


def plot_metrics(metrics_path: str | Path, path: str | Path) -> None:
    """Chart of a training run's ``metrics.jsonl`` (``step``, ``loss``, ``lr`` per line; ``val_loss`` where the
    validation loss was measured, alone on the ``step`` 0 line measured before training)."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    draw_training_plot(
        [r["step"] for r in train],
        [r["loss"] for r in train],
        [r["lr"] for r in train],
        path,
        title=f"training loss ({Path(metrics_path).parent.name})",
        val_steps=[r["step"] for r in val],
        val_losses=[r["val_loss"] for r in val],
    )


SERIES = [(20, 70, 170), (200, 30, 60), (40, 150, 60), (225, 120, 20), (130, 60, 170), (90, 90, 90)]


def draw_line_chart(series: dict, path: str | Path, title: str, xlabel: str, ylabel: str) -> None:
    """Lines with markers, ``{label: [(x, y), ...]}``, one colour each (up to six), with ticks and a legend; written
    to ``path`` atomically."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, TOP, HEIGHT - BOTTOM
    draw.text((x0, 10), title, font=font, fill=INK)
    points = [p for line in series.values() for p in line]
    if points:
        xs, ys = np.array([p[0] for p in points], np.float64), np.array([p[1] for p in points], np.float64)
        s_lo, s_hi = float(xs.min()), float(max(xs.max(), xs.min() + 1))
        pad = 0.05 * ((ys.max() - ys.min()) or abs(ys.max()) or 1.0)
        l_lo, l_hi = float(ys.min() - pad), float(ys.max() + pad)

        def at(x, y):
            return x0 + (x - s_lo) / (s_hi - s_lo) * (x1 - x0), y1 - (y - l_lo) / (l_hi - l_lo) * (y1 - y0)

        for tick in nice_ticks(s_lo, s_hi):
            x = at(tick, l_lo)[0]
            draw.line([(x, y0), (x, y1)], fill=GRID)
            draw.text((x, y1 + 6), f"{tick:g}", font=font, fill=INK, anchor="ma")
        for tick in nice_ticks(l_lo, l_hi):
            y = at(s_lo, tick)[1]
            draw.line([(x0, y), (x1, y)], fill=GRID)
            draw.text((x0 - 6, y), _label(tick), font=font, fill=INK, anchor="rm")
        for line, colour in zip(series.values(), SERIES):
            pixels = [at(x, y) for x, y in sorted(line)]
            if len(pixels) > 1:
                draw.line(pixels, fill=colour, width=2)
            for x, y in pixels:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    draw.rectangle([x0, y0, x1, y1], outline=INK)
    draw.text(((x0 + x1) // 2, HEIGHT - 18), xlabel, font=font, fill=INK, anchor="ma")
    _vertical_text(img, ylabel, 6, (y0 + y1) // 2, font, INK)
    for i, (label, colour) in enumerate(zip(series, SERIES)):
        y = y0 + 10 + 14 * i
        draw.line([(x1 - 150, y), (x1 - 132, y)], fill=colour, width=3)
        draw.text((x1 - 126, y), label, font=font, fill=INK, anchor="lm")
    save_image(path, img)
