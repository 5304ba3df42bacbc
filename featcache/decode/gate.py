"""What every decode backend refuses before decoding: one rule set, read from the file's header.

A decoder allocates what a header claims. An 87-byte PNG can claim 8000 x 1
pixels, a 389 KB PNG 20000 x 20000, a 12 KB JPEG 12000 x 12000 over a few
bytes of data (torchvision then fills it with grey). So before any backend
decodes a file, its header is read (PIL, lazily: no pixels) and the file is
refused with a reason when it is not a JPEG or PNG (a GIF named ``.jpeg``),
holds several frames, has more pixels or a longer side ratio than any
radiograph, or is a JPEG whose data stops before its end marker.
"""

from __future__ import annotations

import io
import warnings

# A 4,300 x 3,500 chest film is 15 MP and a full-field mammogram about 30 MP; 64 MP leaves room and still
# bounds the decoded bytes (3 x 64 MP = 192 MB per image in flight).
MAX_PIXELS = 64 * 2**20
# The longest side over the shortest: radiographs are near-square; a strip is no image of a chest.
MAX_ASPECT = 8.0
FORMATS = ("JPEG", "PNG")
JPEG_END = b"\xff\xd9"
# Bytes after a JPEG's end marker that are still tolerated (padding, some cameras' trailers).
JPEG_TAIL = 4096


class Refused(ValueError):
    """A file the gate turns away; its message is the reason stored in ``skipped``."""


def check(raw: bytes) -> None:
    """Raise :class:`Refused` for a file no backend should decode; return for one every backend may."""
    from PIL import Image, UnidentifiedImageError

    if not raw:
        raise Refused("empty file")
    try:
        with warnings.catch_warnings():  # PIL warns past 89 MP; the limit below speaks instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(raw))
        with im:
            fmt, (w, h) = im.format, im.size
            frames = getattr(im, "n_frames", 1) if fmt in FORMATS else 1  # an APNG is a PNG
    except UnidentifiedImageError:
        raise Refused("not an image") from None
    except Image.DecompressionBombError:
        raise Refused(f"more than {MAX_PIXELS // 2**20} megapixels") from None
    except (OSError, ValueError, SyntaxError) as exc:  # a header PIL cannot parse: broken, whatever it is
        if "truncated" in str(exc).lower():
            raise Refused("truncated image") from None
        raise Refused(f"unreadable image header ({str(exc)[:80]})") from None
    if fmt not in FORMATS:
        raise Refused(f"{fmt} data, not JPEG or PNG")
    if frames > 1:
        raise Refused(f"{frames} frames (an animation), not one image")
    if w < 1 or h < 1 or w * h > MAX_PIXELS:
        raise Refused(f"{w} x {h} pixels, over the {MAX_PIXELS // 2**20}-megapixel limit")
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise Refused(f"{w} x {h} pixels, a side ratio over {MAX_ASPECT:g}")
    if fmt == "JPEG" and JPEG_END not in raw[-JPEG_TAIL:]:
        raise Refused("truncated image")  # no end marker: the stream stops early


def check_file(path: str, limit: int = 128 * 1024) -> str | None:
    """The reason ``path`` is refused, reading its head and tail only; None when it may be decoded."""
    import os

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(limit)
            if size > limit:  # the tail holds a JPEG's end marker
                f.seek(max(limit, size - JPEG_TAIL))
                head += f.read()
        check(head)  # the head for PIL's header parse, the tail (appended) for the end-marker test
    except Refused as exc:
        return str(exc)
    except OSError as exc:
        return f"unreadable file ({exc.__class__.__name__})"
    return None

