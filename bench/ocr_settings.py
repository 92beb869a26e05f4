"""The ocr reward with PaddleOCR's detector settings (our default) and with rapidocr's own:
`python bench/ocr_settings.py`

The published OCR reward runs PaddleOCR 2.9, whose DB text detector keeps boxes scoring >= 0.6,
grows them by unclip ratio 1.5 and does not dilate the probability map; rapidocr defaults to 0.5,
1.6 and dilation. Both run here on the same PIL-rendered 512 px images: 5 fonts (DejaVu faces on
this machine and Pillow's bundled one), font sizes 10 / 16 / 28 / 48 px, six texts of 4 to 43
characters (long ones wrapped at word boundaries), three styles: black on white; light text on a
coloured board over a noisy background; degraded (grey on grey, rotated 7 degrees, blurred, the
way generated text often looks). Each image's prompt quotes its own text, so a perfect reader
scores 1. Prints a markdown table: mean reward overall, by text height, by length, the
share read exactly (reward 1) and seconds per image on one CPU thread.
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter, ImageFont  # noqa: E402

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = ["DejaVuSans.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSansMono.ttf", "DejaVuSansCondensed-BoldOblique.ttf",
         None]  # None: Pillow's bundled font
HEIGHTS = [10, 16, 28, 48]
TEXTS = ["OPEN", "Fresh Coffee", "clean flow 2025", "Welcome to Paris", "No parking after 9 pm",
         "The quick brown fox jumps over the lazy dog"]
STYLES = ["plain", "sign", "degraded"]


def font(name, height):
    if name is None:
        return ImageFont.load_default(size=height)
    return ImageFont.truetype(str(FONT_DIR / name), size=height)


def wrap(text, face, width):
    """Greedy word wrap to lines at most `width` pixels wide."""
    lines = [""]
    for word in text.split():
        trial = f"{lines[-1]} {word}".strip()
        if lines[-1] and face.getlength(trial) > width:
            lines.append(word)
        else:
            lines[-1] = trial
    return lines


def render(text, face, style, seed, size=512):
    """(3, size, size) float [0, 1]: the text centred, wrapped to 85 % of the width."""
    rng = np.random.default_rng(seed)
    lines = wrap(text, face, 0.85 * size)
    boxes = [face.getbbox(line) for line in lines]
    line_height = max(b[3] - b[1] for b in boxes) * 1.4
    block_w, block_h = max(b[2] - b[0] for b in boxes), line_height * len(lines)
    left, top = (size - block_w) / 2, (size - block_h) / 2
    if style == "plain":
        image = Image.new("RGB", (size, size), "white")
        ink = (0, 0, 0)
    elif style == "degraded":
        image = Image.new("RGB", (size, size), (150, 150, 140))
        ink = (70, 70, 80)
    else:
        noise = rng.normal(120, 40, (size, size, 3)).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(noise)
        board = tuple(int(c) for c in rng.integers(20, 90, 3))
        margin = 0.6 * line_height
        ImageDraw.Draw(image).rectangle([left - margin, top - margin, left + block_w + margin, top + block_h + margin],
                                        fill=board)
        ink = (245, 235, 200)
    draw = ImageDraw.Draw(image)
    for i, (line, box) in enumerate(zip(lines, boxes)):
        draw.text((left + (block_w - (box[2] - box[0])) / 2 - box[0], top + i * line_height - box[1]), line,
                  fill=ink, font=face)
    if style == "degraded":
        image = image.rotate(7, resample=Image.Resampling.BICUBIC, fillcolor=(150, 150, 140))
        image = image.filter(ImageFilter.GaussianBlur(0.08 * face.size))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def cases():
    """Every (font, height, text, style) with its image."""
    for f, name in enumerate(FONTS):
        for height in HEIGHTS:
            face = font(name, height)
            for t, text in enumerate(TEXTS):
                for s, style in enumerate(STYLES):
                    yield dict(font=name or "Pillow default", height=height, text=text, style=style,
                               image=render(text, face, style, seed=1000 * f + 100 * t + 10 * s + height))


def main(args):
    from common.reward_models import ocr_reward

    items = list(cases())
    if args.limit:
        items = items[::max(1, len(items) // args.limit)][:args.limit]
    columns = [("all", lambda c: True)]
    columns += [(f"{h} px", lambda c, h=h: c["height"] == h) for h in HEIGHTS]
    columns += [(style, lambda c, style=style: c["style"] == style) for style in STYLES]
    columns += [("≤ 12 chars", lambda c: len(c["text"]) <= 12), ("13–20", lambda c: 12 < len(c["text"]) <= 20),
                ("> 20", lambda c: len(c["text"]) > 20)]
    results = {}
    for setting in ("paddleocr", "rapidocr"):
        reward = ocr_reward(None if setting == "paddleocr" else setting)
        start, scores = time.perf_counter(), []
        for item in items:
            scores.append(float(reward(item["image"][None], [f'a sign that says "{item["text"]}"'], [{}])["ocr"][0]))
        results[setting] = (np.array(scores), (time.perf_counter() - start) / len(items))
    print(f"{len(items)} images ({len(FONTS)} fonts x {len(HEIGHTS)} heights x {len(TEXTS)} texts x "
          f"{len(STYLES)} styles), mean ocr reward:\n")
    print("| detector settings | " + " | ".join(name for name, _ in columns) + " | read exactly | s / image |")
    print("|---" * (len(columns) + 3) + "|")
    labels = {"paddleocr": "PaddleOCR's (box 0.6, unclip 1.5, no dilation; default)",
              "rapidocr": "rapidocr's (box 0.5, unclip 1.6, dilation; `ocr:rapidocr`)"}
    for setting, (scores, seconds) in results.items():
        cells = [f"{scores[[keep(c) for c in items]].mean():.3f}" for _, keep in columns]
        print(f"| {labels[setting]} | " + " | ".join(cells) + f" | {np.mean(scores == 1):.2f} | {seconds:.2f} |")
    diff = results["paddleocr"][0] - results["rapidocr"][0]
    print(f"\nimages scored differently: {int((diff != 0).sum())} of {len(items)}; mean difference "
          f"{diff.mean():+.4f} (PaddleOCR's settings minus rapidocr's)")
    for setting, (scores, _) in results.items():
        worst = sorted(range(len(items)), key=lambda i: scores[i])[:3]
        print(f"lowest with {setting}: " + "; ".join(f"{items[i]['font']} {items[i]['height']} px {items[i]['style']} "
                                                      f"{items[i]['text']!r}: {scores[i]:.2f}" for i in worst))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=0, help="score only this many images, spread over the set")
    main(parser.parse_args())
