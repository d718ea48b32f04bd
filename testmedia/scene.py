"""Real photographs that scikit-image ships, composed into face scenes for the tests and the bench:
the astronaut's head (a real face) pasted over the coffee photograph (no face in it)."""

import functools

import numpy as np

# The astronaut's head (hair to chin) in skimage.data.astronaut(), rows then columns.
HEAD_ROWS, HEAD_COLUMNS = slice(20, 210), slice(145, 310)
PAN_MARGIN = 40  # extra width of the background, so it can pan by up to this many pixels


@functools.cache
def photo(name):
    """scikit-image's photograph `name` ("coffee", "astronaut", ...), read once (a PNG takes ms),
    read-only because it is shared."""
    from skimage import data

    image = getattr(data, name)()
    image.flags.writeable = False
    return image


def coffee_background(width, height, shift=0):
    """scikit-image's coffee photograph at width x height, shifted right by `shift` pixels."""
    import cv2

    scene = cv2.resize(photo("coffee"), (width + PAN_MARGIN, height), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(scene[:, shift:shift + width])


def astronaut_head(flip=False):
    patch = photo("astronaut")[HEAD_ROWS, HEAD_COLUMNS]
    return np.ascontiguousarray(patch[:, ::-1] if flip else patch)


def paste(canvas, patch, x, y, height):
    """Pastes `patch` scaled to `height` pixels with its top-left corner at (x, y), cut off where it
    leaves the canvas; returns its whole box (x0, y0, x1, y1), which may reach outside."""
    import cv2

    width = round(patch.shape[1] * height / patch.shape[0])
    scaled = cv2.resize(patch, (width, height), interpolation=cv2.INTER_AREA)
    left, top = max(x, 0), max(y, 0)
    right, bottom = min(x + width, canvas.shape[1]), min(y + height, canvas.shape[0])
    if left < right and top < bottom:
        canvas[top:bottom, left:right] = scaled[top - y:bottom - y, left - x:right - x]
    return np.array([x, y, x + width, y + height], dtype=np.float64)
