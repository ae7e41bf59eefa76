"""Raster images of a credential, for the places that show no SVG.

LinkedIn, Facebook, X and Slack render a link preview only from a raster `og:image` (1200x630 is
the size they all crop well), and an email signature or a CV needs a PNG badge. Both are drawn
with Pillow from the credential's names: the same seal as `pages.badge_svg`, and a share card with
the badge, the names, the date and the status. Drawing one takes about 0.2 s of CPU, so results
are kept (by their inputs, so a status change draws a new card; about 110 KB each), drawing runs on
`DRAWING`, one thread that never takes more than one CPU from the event loop, and names are cut to
`MAX_TEXT` characters before they are laid out.

The text is set in Pillow's bundled font (Aileron, Latin script); a name in another script shows
as boxes rather than failing.
"""

import functools
import io
import struct
import textwrap
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Final

from PIL import Image, ImageChops, ImageDraw, ImageFont, ImageOps

from .domain import DisplayStatus
from .pages import STATUS_COLOUR, STATUS_TEXT

CARD_SIZE: Final = (1200, 630)
BADGE_SIZE: Final = 600
MAX_TEXT: Final = 200  # characters of a name laid out; more could never show on the image anyway
_CACHED: Final = 128  # images of each kind kept, about 14 MB each
DRAWING: Final = ThreadPoolExecutor(max_workers=1, thread_name_prefix="images")

_GOLD, _BLUE_LIGHT, _BLUE_DARK = "#d9a520", "#2f5fd0", "#173a8c"
_INK, _MUTED, _PAPER = "#1f2328", "#57606a", "#f4f5f7"


@functools.lru_cache(maxsize=_CACHED)
def badge_png(name: str, issuer_name: str) -> bytes:
    """The badge as a square PNG of BADGE_SIZE pixels."""
    return _png(_badge(name[:MAX_TEXT], issuer_name[:MAX_TEXT], BADGE_SIZE))


@functools.lru_cache(maxsize=_CACHED)
def share_card_png(
    name: str, issuer_name: str, learner_name: str, issued_at: datetime, status: DisplayStatus
) -> bytes:
    """The link-preview card, CARD_SIZE: the badge, what was earned, by whom, from whom, and
    whether it still stands."""
    name, issuer_name, learner_name = name[:MAX_TEXT], issuer_name[:MAX_TEXT], learner_name[:MAX_TEXT]
    card = Image.new("RGB", CARD_SIZE, _PAPER)
    draw = ImageDraw.Draw(card)
    draw.rounded_rectangle((24, 24, CARD_SIZE[0] - 24, CARD_SIZE[1] - 24), radius=24, fill="white")
    badge = _badge(name, issuer_name, 420)
    card.paste(badge, (64, 105), badge)

    left, right = 530, CARD_SIZE[0] - 70
    title = _font(54)
    lines = _wrap(draw, name, title, right - left, max_lines=3)
    y = 120
    for line in lines:
        draw.text((left, y), line, font=title, fill=_INK, stroke_width=1, stroke_fill=_INK)
        y += 66
    y += 18
    body = _font(32)
    for prefix, text in (("Awarded to ", learner_name), ("by ", issuer_name)):
        (line,) = _wrap(draw, prefix + text, body, right - left, max_lines=1)
        draw.text((left, y), line, font=body, fill=_INK)
        y += 46
    draw.text((left, y), f"Issued {issued_at:%d %B %Y}", font=body, fill=_MUTED)

    pill = _font(30)
    label = STATUS_TEXT[status]
    width = draw.textlength(label, font=pill)
    top = CARD_SIZE[1] - 130
    draw.rounded_rectangle((left, top, left + width + 44, top + 54), radius=27, fill=STATUS_COLOUR[status])
    draw.text((left + 22, top + 11), label, font=pill, fill="white")
    return _png(card)


# Open Badges 3.0 baking (§5.3): the signed credential travels inside the badge image.
BAKED_KEYWORD: Final = b"openbadgecredential"


def baked_png(badge: bytes, credential_json: str) -> bytes:
    """`badge` (a PNG) with the signed credential in an uncompressed `openbadgecredential` iTXt
    chunk before IEND, so a copy of the image carries its own proof."""
    assert badge.endswith(b"IEND\xaeB`\x82"), "a PNG ends with its IEND chunk"
    # keyword, NUL, compression flag and method (none), empty language tag and translated keyword
    data = BAKED_KEYWORD + b"\0\0\0\0\0" + credential_json.encode()
    chunk = struct.pack(">I", len(data)) + b"iTXt" + data + struct.pack(">I", zlib.crc32(b"iTXt" + data))
    return badge[:-12] + chunk + badge[-12:]


def _badge(name: str, issuer_name: str, size: int) -> Image.Image:
    """The seal on a transparent square of `size` pixels (drawn at 2x and scaled down, for edges)."""
    big = size * 2
    scale = big / 300  # the SVG's coordinates
    badge = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(badge)
    draw.ellipse(_circle(150, 144, scale), fill=_GOLD)

    # Top-left to bottom-right, as the SVG's linearGradient: the mean of a vertical and a
    # horizontal ramp.
    vertical = Image.linear_gradient("L").resize((big, big))
    diagonal = ImageChops.add(vertical, vertical.transpose(Image.Transpose.ROTATE_90), scale=2)
    gradient = ImageOps.colorize(diagonal, _BLUE_LIGHT, _BLUE_DARK)
    mask = Image.new("L", (big, big), 0)
    ImageDraw.Draw(mask).ellipse(_circle(150, 132, scale), fill=255)
    badge.paste(gradient, (0, 0), mask)
    draw.ellipse(_circle(150, 120, scale), outline=(255, 255, 255, 102), width=round(2 * scale))

    font = _font(round(22 * scale))
    lines = textwrap.wrap(name, width=18, max_lines=4, placeholder="...") or [""]
    first = 150 - (len(lines) - 1) * 13
    for number, line in enumerate(lines):
        position = (150 * scale, (first + 26 * number) * scale)
        draw.text(position, line, font=font, fill="white", anchor="ms", stroke_width=1, stroke_fill="white")
    issuer = textwrap.shorten(issuer_name, width=30, placeholder="...")
    draw.text((150 * scale, 250 * scale), issuer, font=_font(round(13 * scale)), fill="white", anchor="ms")
    return badge.resize((size, size), Image.Resampling.LANCZOS)


def _circle(centre: float, radius: float, scale: float) -> tuple[float, float, float, float]:
    return (
        (centre - radius) * scale,
        (centre - radius) * scale,
        (centre + radius) * scale,
        (centre + radius) * scale,
    )


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size=size)
    assert isinstance(font, ImageFont.FreeTypeFont)  # Pillow's wheels are built with FreeType
    return font


def _wrap(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont, width: float, *, max_lines: int
) -> list[str]:
    """`text` in lines no wider than `width` pixels, at most `max_lines`; what does not fit is cut
    with "..."."""
    lines: list[str] = []
    words = text.split() or [""]
    while words and len(lines) < max_lines:
        line = words.pop(0)
        while words and draw.textlength(f"{line} {words[0]}", font=font) <= width:
            line = f"{line} {words.pop(0)}"
        lines.append(line)
    if words:
        lines[-1] = f"{lines[-1]} {' '.join(words)}"
    return [_fit(draw, line, font, width) for line in lines]


def _fit(draw: ImageDraw.ImageDraw, line: str, font: ImageFont.FreeTypeFont, width: float) -> str:
    if draw.textlength(line, font=font) <= width:
        return line
    # The longest start of the line that fits with "...", by bisection: a few measurements.
    low, high = 0, len(line)
    while low < high:
        middle = (low + high + 1) // 2
        if draw.textlength(line[:middle] + "...", font=font) <= width:
            low = middle
        else:
            high = middle - 1
    return line[:low].rstrip() + "..."


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
