"""emotiw.face.align: facenet-style margin crops (dsn) and 5-point similarity warps (sse)."""

import cv2
import numpy as np
import pytest

from emotiw.face.align import (
    ARCFACE_TEMPLATE_112,
    align_face,
    crop_dsn,
    crop_sse,
    resize_whole,
    similarity_matrix,
    sse_template,
)
from emotiw.recipes import RECIPES


def coordinate_image(height=300, width=400):
    """Each pixel holds its own coordinates: red = x / 2, green = y / 2, blue 0."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs // 2, ys // 2, np.zeros_like(xs)], axis=-1).astype(np.uint8)


def test_dsn_crop_grows_the_box_by_half_the_margin_on_each_side():
    image = coordinate_image()
    # margin 40: the crop spans x 100-40/2 = 80 .. 200+20 = 220, y 60 .. 180; resized to 2x
    face = crop_dsn(image, (100.7, 80.2, 200.0, 160.0), size=280, margin=40)
    assert face.shape == (280, 280, 3)
    # int() truncates 80.7 to 80 and 60.2 to 60, as facenet's int32 box did
    assert face[0, 0, :2].tolist() == [80 // 2, 60 // 2]
    assert abs(int(face[-1, -1, 0]) - 219 // 2) <= 1 and abs(int(face[-1, -1, 1]) - 179 // 2) <= 1


def test_dsn_crop_is_clipped_to_the_image():
    image = coordinate_image()
    face = crop_dsn(image, (10, 5, 110, 105), size=100, margin=100)
    assert face[0, 0, :2].tolist() == [0, 0]  # x 10-50 and y 5-50 clip at 0
    assert abs(int(face[-1, -1, 0]) - 159 // 2) <= 1 and abs(int(face[-1, -1, 1]) - 154 // 2) <= 1


def test_sse_warp_puts_the_landmarks_on_the_template():
    size = 128
    template = sse_template(size)
    # landmarks: the template rotated by 20 degrees, scaled by 1.7 and moved, in a larger image
    angle = np.deg2rad(20)
    rotation = 1.7 * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = template @ rotation.T + [150, 60]
    image = np.zeros((360, 400, 3), np.uint8)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    for (x, y), colour in zip(landmarks, colours):
        cv2.circle(image, (int(round(x)), int(round(y))), 4, colour, -1)
    face = crop_sse(image, landmarks, size)
    assert face.shape == (size, size, 3)
    for point, colour in zip(template, colours):
        mask = np.all(np.abs(face.astype(int) - colour) < 100, axis=-1)
        ys, xs = np.nonzero(mask)
        assert len(xs) > 0
        assert np.hypot(xs.mean() - point[0], ys.mean() - point[1]) < 1.0
    assert similarity_matrix(landmarks, size) @ [*landmarks[0], 1] == pytest.approx(template[0], abs=1e-6)


def test_sse_template_is_arcface_scaled_to_the_canvas():
    assert sse_template(112) == pytest.approx(ARCFACE_TEMPLATE_112)
    # the eyes' midpoint sits at the same relative place on any canvas
    for size in (112, 128, 224):
        eyes = sse_template(size)[:2].mean(axis=0) / size
        assert eyes == pytest.approx([(38.2946 + 73.5318) / 2 / 112, (51.6963 + 51.5014) / 2 / 112])


def test_modes_sizes_and_gray():
    image = coordinate_image()
    box, landmarks = (100, 80, 200, 180), sse_template(100) + [100, 80]
    assert (RECIPES["dsn"].crop_size, RECIPES["dsn"].margin, RECIPES["sse"].crop_size) == (400, 100, 128)
    assert align_face(image, box, landmarks, "facenet", 400, 100).shape == (400, 400, 3)
    assert align_face(image, box, landmarks, "similarity", 96).shape == (96, 96, 3)
    colour = align_face(image, box, landmarks, "similarity", 128)
    gray = align_face(image, box, landmarks, "similarity", 128, gray=True)
    assert gray.shape == (128, 128) and gray.dtype == np.uint8
    assert gray == pytest.approx(cv2.cvtColor(colour, cv2.COLOR_RGB2GRAY), abs=1)
    whole = resize_whole(image, 128)
    assert whole.shape == (128, 128, 3)
    assert whole[0, 0, :2].tolist() == [0, 0]
