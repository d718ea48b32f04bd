"""LBP-TOP (Zhao and Pietikäinen, 2007), the EmotiW organisers' baseline, of a face sequence.

Uniform LBP codes (scikit-image's `local_binary_pattern`, P points on a circle of radius R,
"nri_uniform": 59 codes for P = 8) on the three orthogonal planes of the aligned face volume
T x H x W: XY (each frame), XT (each row over time) and YT (each column over time). The volume is
split into a grid of spatial blocks; each block has one histogram per plane, over every slice of
that plane inside it, normalised to sum 1. The descriptor is the concatenation: blocks x 3 x 59.
Codes need R pixels of context, so the R outermost slices in time (and space) are not coded.
"""

import numpy as np

from emotiw.errors import UserError

POINTS, RADIUS = 8, 1
GRID = (4, 4)  # blocks down and across the face
def bins(points=POINTS):
    """Codes of "nri_uniform": P (P - 1) + 3, 59 for P = 8."""
    return points * (points - 1) + 3


def plane_codes(plane, points=POINTS, radius=RADIUS):
    """Uniform LBP codes of one 2-D plane, without its `radius`-wide border (no neighbours there)."""
    from skimage.feature import local_binary_pattern

    codes = local_binary_pattern(plane, points, radius, method="nri_uniform").astype(np.int64)
    return codes[radius:-radius, radius:-radius]


def histogram(codes, size):
    counts = np.bincount(codes.reshape(-1), minlength=size)[:size].astype(np.float64)
    return counts / counts.sum() if counts.sum() else counts


def lbp_top(volume, grid=GRID, points=POINTS, radius=RADIUS):
    """The LBP-TOP descriptor of a T x H x W grayscale volume (0..255), float32."""
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise UserError(f"LBP-TOP needs a T x H x W grayscale face volume, got shape {volume.shape}")
    frames, height, width = volume.shape
    least = 2 * radius + 1
    if frames < least or height < least * grid[0] or width < least * grid[1]:
        raise UserError(f"a face sequence of {frames} frames of {height}x{width} is too short for LBP-TOP "
                        f"(radius {radius} needs at least {least} frames and {least} pixels per block)")
    volume = volume.astype(np.uint8)  # integer grey levels: LBP compares them exactly
    # codes per plane over the whole volume, then cut into blocks: [t, y, x] -> code
    xy = np.stack([plane_codes(volume[t], points, radius) for t in range(radius, frames - radius)])
    xt = np.stack([plane_codes(volume[:, y, :], points, radius) for y in range(radius, height - radius)], axis=1)
    yt = np.stack([plane_codes(volume[:, :, x], points, radius) for x in range(radius, width - radius)], axis=2)
    parts = []
    rows = np.array_split(np.arange(height - 2 * radius), grid[0])
    cols = np.array_split(np.arange(width - 2 * radius), grid[1])
    for block_rows in rows:
        for block_cols in cols:
            for codes in (xy, xt, yt):
                parts.append(histogram(codes[:, block_rows][:, :, block_cols], bins(points)))
    return np.concatenate(parts).astype(np.float32)
