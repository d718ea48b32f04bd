"""Frontal face crops from the face mesh (emotiw.face.mesh): the face as seen from the front.

After Hassner et al., "Effective Face Frontalization in Unconstrained Images" (CVPR 2015), with
MediaPipe's canonical face as the one 3-D reference head and the 468-point mesh to place it:
  1. the frontal template: the canonical face projected orthographically from the front, placed
     by the similarity that takes its 5 points (eye centres, nose tip, mouth corners) onto the
     `similarity` recipe's template, so frontal and similarity crops frame a face alike;
  2. the reference head placed on the face: the head pose (emotiw.face.mesh.head_pose) puts the
     canonical face where it best explains the mesh points, rigidly. As in Hassner et al., the
     texture is read through this rigid reference, not through the points themselves, so an open
     mouth or raised brows stay in the crop instead of being warped onto the reference's neutral
     shape;
  3. every crop pixel inside the template's mesh belongs to one triangle, with barycentric
     coordinates (computed once per crop size); the same coordinates in that triangle of the
     placed reference say where the pixel comes from: a piecewise-affine warp, one cv2.remap;
  4. soft symmetry: a triangle turned away from the camera shows less of itself (its area in the
     source against its frontal area, after scale); where its mirror triangle (the canonical mesh
     is left-right symmetric) is better seen, its pixels are blended towards the mirror's, in
     proportion;
  5. pixels outside the mesh (hair, neck, background) come from the 5-point similarity warp of the
     placed reference, so the crop has no hole.
"""

import functools

import numpy as np

from emotiw.face.align import similarity_matrix
from emotiw.face.mesh import LEFT_EYE_CORNERS, RIGHT_EYE_CORNERS, canonical_face, head_pose

# Mesh points standing for MTCNN's five: eye centres (two corners each), nose tip, mouth corners
FIVE_POINTS = (LEFT_EYE_CORNERS, RIGHT_EYE_CORNERS, (4,), (61,), (291,))
VISIBLE_AREA = 0.6  # a triangle keeping this share of its frontal area (or more) is fully visible


def five_points(points):
    """MTCNN-like 5 points (5, 2) of one face's mesh points (image-left eye first)."""
    return np.array([np.asarray(points)[list(group), :2].mean(axis=0) for group in FIVE_POINTS])


@functools.cache
def mirror_vertices():
    """For every canonical vertex, the index of its mirror image across the face's midline."""
    vertices = canonical_face()[0]
    mirrored = vertices * np.array([-1.0, 1.0, 1.0])
    distances = ((mirrored[:, None, :] - vertices[None, :, :]) ** 2).sum(axis=2)
    return distances.argmin(axis=1)


@functools.cache
def frontal_template(size):
    """(template points (468, 2) in crop pixels, triangle per pixel (size, size), -1 outside the
    mesh, and barycentric coordinates per pixel (size, size, 3)) for a size x size crop."""

    vertices, triangles, _ = canonical_face()
    frontal = vertices[:, :2] * np.array([1.0, -1.0])  # seen from the front: y down
    matrix = similarity_matrix(five_points(np.column_stack([frontal, np.zeros(len(frontal))])), size)
    template = frontal @ matrix[:, :2].T + matrix[:, 2]
    owner = np.full((size, size), -1, dtype=np.int32)
    barycentric = np.zeros((size, size, 3))
    for index, triangle in enumerate(triangles):
        a, b, c = template[triangle]
        left, top = np.floor(np.minimum(np.minimum(a, b), c)).astype(int).clip(0, size - 1)
        right, bottom = np.ceil(np.maximum(np.maximum(a, b), c)).astype(int).clip(0, size - 1)
        ys, xs = np.mgrid[top:bottom + 1, left:right + 1].astype(np.float64)
        weights = _barycentric(np.stack([xs, ys], axis=-1), a, b, c)
        inside = (weights >= -1e-9).all(axis=-1)  # pixel centres in the triangle, edges included
        owner[ys[inside].astype(int), xs[inside].astype(int)] = index
        barycentric[ys[inside].astype(int), xs[inside].astype(int)] = weights[inside]
    return template, owner, barycentric


def _barycentric(pixels, a, b, c):
    """Barycentric coordinates (..., 3) of pixel positions (..., 2) in the triangle a, b, c."""
    v0, v1, v2 = b - a, c - a, pixels - a
    denominator = v0[0] * v1[1] - v1[0] * v0[1]
    if abs(denominator) < 1e-12:  # a degenerate triangle holds no pixel
        return np.full(pixels.shape[:-1] + (3,), -1.0)
    beta = (v2[..., 0] * v1[1] - v1[0] * v2[..., 1]) / denominator
    gamma = (v0[0] * v2[..., 1] - v2[..., 0] * v0[1]) / denominator
    return np.stack([1 - beta - gamma, beta, gamma], axis=-1)


def signed_areas(points, triangles):
    a, b, c = points[triangles[:, 0], :2], points[triangles[:, 1], :2], points[triangles[:, 2], :2]
    return 0.5 * ((b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1]))


def visibility(points, template):
    """Per canonical triangle, 0 (turned away) to 1 (seen whole): its signed area in the source
    against its area in the template, both after the similarity between them is taken out."""
    triangles = canonical_face()[1]
    source = signed_areas(points, triangles)
    frontal = signed_areas(template, triangles)
    ratio = source * (np.abs(frontal).sum() / max(np.abs(source).sum(), 1e-9)) / np.where(frontal == 0, 1e-9, frontal)
    return np.clip(ratio / VISIBLE_AREA, 0.0, 1.0)


@functools.cache
def _pixel_maps(size):
    """Sparse (size * size, 468) matrices taking the 468 placed points to every crop pixel's source
    position: its triangle's vertices weighted by its barycentric coordinates, and the same with
    the vertices' mirror images. One sparse product per map instead of a gather per pixel."""
    from scipy.sparse import csr_matrix

    _, owner, barycentric = frontal_template(size)
    corners = canonical_face()[1][np.maximum(owner, 0)].reshape(-1, 3)
    rows = np.repeat(np.arange(size * size), 3)
    weights = barycentric.reshape(-1).astype(np.float32)
    shape = (size * size, len(mirror_vertices()))
    return (csr_matrix((weights, (rows, corners.ravel())), shape=shape),
            csr_matrix((weights, (rows, mirror_vertices()[corners].ravel())), shape=shape))


def frontal_crop(image, points, size, pose=None):
    """The size x size frontal RGB crop of one face of `image` from its 468 mesh points (source
    pixels); `pose`: their head_pose, when already known."""
    import cv2

    template, owner, _ = frontal_template(size)
    own_pixels, mirror_pixels = _pixel_maps(size)
    pose = pose or head_pose(points)
    placed = pose.fitted()[:, :2].astype(np.float32)
    own_map = np.asarray(own_pixels @ placed, dtype=np.float32).reshape(size, size, 2)
    mirror_map = np.asarray(mirror_pixels @ placed, dtype=np.float32).reshape(size, size, 2)
    seen = visibility(placed, template)
    # blend towards the mirror only where the mirror triangle is better seen
    seen = np.where(seen[mirror_triangles()] > seen, seen, 1.0)
    blend = seen[np.maximum(owner, 0)].astype(np.float32)[..., None]
    background = cv2.warpAffine(image, similarity_matrix(five_points(placed), size), (size, size),
                                flags=cv2.INTER_LINEAR, borderValue=0.0)
    own = cv2.remap(image, own_map[..., 0], own_map[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    mirrored = cv2.remap(image, mirror_map[..., 0], mirror_map[..., 1], cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT)
    face = blend * own + (1 - blend) * mirrored
    blended = np.where((owner >= 0)[..., None], face, background)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


@functools.cache
def mirror_triangles():
    """For every canonical triangle, the index of its mirror triangle."""
    triangles = canonical_face()[1]
    mirror = mirror_vertices()
    index = {frozenset(triangle.tolist()): position for position, triangle in enumerate(triangles)}
    return np.array([index.get(frozenset(mirror[triangle].tolist()), position)
                     for position, triangle in enumerate(triangles)])
