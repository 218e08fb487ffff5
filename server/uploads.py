"""Upload checks: type allow-list by magic bytes, pixel cap from the header before decoding, re-encode.

Order (docs/serving.md §7): the byte cap is enforced by `server.limits` while the body streams; here
a declared or sniffed type outside PNG/JPEG/WebP is 415, a header over the size caps is 400 (never
decoded), an undecodable image is 422, and what passes is re-encoded to PNG without metadata.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps

from server.errors import ImageTooLarge, InvalidInput, UnsupportedMediaType

ALLOWED = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
# Declared types that say nothing about the content; the bytes decide.
_GENERIC = {"", "application/octet-stream", "binary/octet-stream"}


def sniff(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def check_declared_type(content_type: str | None) -> None:
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype not in _GENERIC and ctype not in ALLOWED:
        raise UnsupportedMediaType(f"image type {ctype!r} is not allowed; send PNG, JPEG or WebP")


def normalize_image(data: bytes, max_pixels: int, max_side: int) -> bytes:
    """Validated upload -> PNG bytes (RGB, no metadata). Blocking: call it off the event loop."""
    if not data:
        raise InvalidInput("the image is empty")
    fmt = sniff(data)
    if fmt is None:
        raise UnsupportedMediaType("the image is not PNG, JPEG or WebP")
    with warnings.catch_warnings():
        # Pillow's own bomb check would only warn below 2x its limit; ours is lower and an error.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=[fmt])  # reads the header only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLarge("the image has too many pixels") from exc
        except Exception as exc:
            raise InvalidInput(f"the {fmt} image could not be read") from exc
        width, height = im.size
        if width < 1 or height < 1:
            raise InvalidInput("the image has zero size")
        if width * height > max_pixels or max(width, height) > max_side:
            raise ImageTooLarge(
                f"the image is {width}x{height}; the limits are {max_pixels} pixels and {max_side} per side"
            )
        try:
            im.load()
            # Phones store the sensor's orientation in EXIF; the pixels must be upright before the
            # metadata is dropped, or the photo is refined sideways (docs/serving.md §7).
            rgb = ImageOps.exif_transpose(im).convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLarge("the image has too many pixels") from exc
        except Exception as exc:
            raise InvalidInput(f"the {fmt} image is truncated or corrupt") from exc
    out = io.BytesIO()
    rgb.save(out, format="PNG", compress_level=1)  # fast; it is only stored until the job runs
    return out.getvalue()
