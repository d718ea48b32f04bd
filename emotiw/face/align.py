"""Turning a detected face into a fixed-size crop, the way each system did it (emotiw.recipes picks one).

`facenet` (DSN): facenet's align_dataset_mtcnn.py, which DSN ran with `--image_size 400 --margin 100`: the
MTCNN box grown by margin/2 pixels on every side, clipped to the image, cut out and resized
(bilinear, PIL, as scipy.misc.imresize did) to size x size. No rotation.

`similarity` (SSE): SSE frontalised its tracked faces with a 3-D face model and rescaled them to 128 x 128; that
model was never released, so we substitute a 2-D similarity warp (rotation, uniform scale,
translation) of the 5 MTCNN landmarks onto a fixed template: ArcFace's 112 x 112 template
(insightface `arcface_dst`) scaled uniformly by size/112, so the face fills the canvas as in an
ArcFace crop.
"""

import numpy as np

# Landmark order: image-left eye, image-right eye, nose tip, image-left mouth corner, image-right
# mouth corner (MTCNN's order).
ARCFACE_TEMPLATE_112 = np.array([
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
])


def sse_template(size):
    """The 5-point template for a size x size canvas."""
    return ARCFACE_TEMPLATE_112 * (size / 112.0)


def margin_box(box, margin, image_shape):
    """facenet's crop box: integer pixels (truncated, as its int32 array did), clipped to the image."""
    height, width = image_shape[:2]
    x1, y1, x2, y2 = box[:4]
    return (int(max(x1 - margin / 2, 0)), int(max(y1 - margin / 2, 0)),
            int(min(x2 + margin / 2, width)), int(min(y2 + margin / 2, height)))


def crop_dsn(image, box, size=400, margin=100):
    from PIL import Image

    x1, y1, x2, y2 = margin_box(box, margin, image.shape)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"the face box {tuple(box[:4])} lies outside the {image.shape[1]}x{image.shape[0]} image")
    cropped = Image.fromarray(np.ascontiguousarray(image[y1:y2, x1:x2]))
    return np.asarray(cropped.resize((size, size), Image.BILINEAR))


def similarity_matrix(landmarks, size):
    """The 2 x 3 similarity transform taking the 5 landmarks onto the template (least squares)."""
    from skimage.transform import SimilarityTransform

    transform = SimilarityTransform.from_estimate(np.asarray(landmarks, dtype=np.float64), sse_template(size))
    if not transform:
        raise ValueError(f"no similarity transform fits the landmarks {np.asarray(landmarks).tolist()}")
    return transform.params[:2]


def crop_sse(image, landmarks, size=128):
    import cv2

    matrix = similarity_matrix(landmarks, size)
    # insightface's norm_crop: bilinear warp, black outside the frame
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0.0)


def to_gray(image):
    """ITU-R 601 luma, what Caffe's `--gray`/cv2 use, as a single-channel uint8 image."""
    import cv2

    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def align_face(image, box, landmarks, alignment, size, margin=0, gray=False):
    """The size x size crop of one face from an RGB image by a recipe's `alignment` (emotiw.recipes):
    "facenet" (the box grown by `margin`) or "similarity" (the 5 landmarks warped onto the template);
    RGB, or single-channel with gray."""
    if alignment == "facenet":
        face = crop_dsn(image, box, size, margin)
    else:
        face = crop_sse(image, landmarks, size)
    return to_gray(face) if gray else face


def resize_whole(image, size, gray=False):
    """An already-aligned face image (`--aligned`), resized to size x size like a facenet crop."""
    height, width = image.shape[:2]
    face = crop_dsn(image, (0, 0, width, height), size, margin=0)
    return to_gray(face) if gray else face
