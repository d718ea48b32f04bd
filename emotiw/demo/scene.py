"""Real photographs that scikit-image ships, composed into face scenes for the tests and the bench:
the astronaut's head (a real face) pasted over the coffee photograph (no face in it)."""

import numpy as np

# The astronaut's head (hair to chin) in skimage.data.astronaut(), rows then columns.
HEAD_ROWS, HEAD_COLUMNS = slice(20, 210), slice(145, 310)
PAN_MARGIN = 40  # extra width of the background, so it can pan by up to this many pixels


def coffee_background(width, height, shift=0):
    """scikit-image's coffee photograph at width x height, shifted right by `shift` pixels."""
    import cv2
    from skimage import data

    scene = cv2.resize(data.coffee(), (width + PAN_MARGIN, height), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(scene[:, shift:shift + width])


def astronaut_head(flip=False):
    from skimage import data

    patch = data.astronaut()[HEAD_ROWS, HEAD_COLUMNS]
    return np.ascontiguousarray(patch[:, ::-1] if flip else patch)


def paste(canvas, patch, x, y, height):
    """Pastes `patch` scaled to `height` pixels with its top-left corner at (x, y); returns its box."""
    import cv2

    width = round(patch.shape[1] * height / patch.shape[0])
    canvas[y:y + height, x:x + width] = cv2.resize(patch, (width, height), interpolation=cv2.INTER_AREA)
    return np.array([x, y, x + width, y + height], dtype=np.float64)
