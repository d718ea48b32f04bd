"""Reading image files: one reader for every still image emotiw takes in."""

import numpy as np

from emotiw.errors import UserError


def read_rgb(path):
    """An image file as H x W x 3 uint8 RGB (gray images come back as 3 channels, as facenet's to_rgb)."""
    import cv2

    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as error:  # cv2.imread would only print a warning and return None
        raise UserError(f"cannot read image {path}: {error.strerror or error}") from None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise UserError(f"cannot read image {path}: not an image file OpenCV can decode")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
