"""Reading image files: one reader for every still image emotiw takes in, and the bound on the
pixels of any image or video frame, checked from the file's header before anything is decoded."""

import os

import numpy as np

from emotiw.errors import UserError

MAX_MEGAPIXELS = 40.0  # a 16384x16384 PNG of 0.8 MB would otherwise take gigabytes once decoded
MAX_MEGAPIXELS_VARIABLE = "EMOTIW_MAX_MEGAPIXELS"  # what --max-pixels sets, so that worker processes see it


def pixel_limit():
    """The largest image or frame emotiw decodes, in megapixels: $EMOTIW_MAX_MEGAPIXELS, else MAX_MEGAPIXELS."""
    return float(os.environ.get(MAX_MEGAPIXELS_VARIABLE, MAX_MEGAPIXELS))


def check_pixels(width, height):
    """UserError when a width x height picture is over pixel_limit()."""
    limit = pixel_limit()
    if width * height > limit * 1e6:
        raise UserError(f"{width}x{height} is larger than the limit of {limit:g} megapixels; --max-pixels raises it")


def check_image_header(path):
    """UserError when `path` is an image file (one Pillow knows) over pixel_limit(); other files pass."""
    size = _header_size(path)
    if size is not None:
        try:
            check_pixels(*size)
        except UserError as error:
            raise UserError(f"{path}: {error}") from None


def _header_size(path):
    """(width, height) from an image file's header (Pillow reads no pixels for it), or None."""
    from PIL import Image, UnidentifiedImageError

    bomb_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # ours applies, not Pillow's
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError, ValueError):
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = bomb_limit


def read_rgb(path):
    """An image file as H x W x 3 uint8 RGB (gray images come back as 3 channels, as facenet's to_rgb)."""
    import cv2

    check_image_header(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as error:  # cv2.imread would only print a warning and return None
        raise UserError(f"cannot read image {path}: {error.strerror or error}") from None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise UserError(f"cannot read image {path}: not an image file OpenCV can decode")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
