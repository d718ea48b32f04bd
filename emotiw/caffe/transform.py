"""Caffe's test-time transform of one image file, as a recipe (emotiw.recipes) says:

- a fixed transform of its own (DSN's test_video.py: resize to 256x256, centre crop 224x224,
  subtract BGR (104, 117, 123), no scale);
- what the net's test.prototxt data layer does (SSE's and the FER model's: resize, crop, mean values
  or mean.binaryproto, scale), with images resized to the net's input size when the layer neither
  resizes nor crops;
- no recipe: resize to the net's input size, nothing else.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emotiw.caffe.proto import data_layers_in_test, read_mean_file, read_net_param
from emotiw.errors import UserError
from emotiw.paths import REPO


@dataclass(frozen=True, eq=False)
class Transform:
    """Caffe's test-time transform of one image: read, resize, subtract the mean, centre crop, scale."""
    channels: int
    resize: tuple = None      # (height, width) or None: keep the image size
    crop: tuple = None        # (height, width) centre crop or None
    mean: np.ndarray = None   # float32 BGR means (C,), or a (C, H, W) mean image
    scale: float = 1.0

    def describe(self):
        mean = self.mean
        if mean is not None:
            mean = (mean.tolist() if mean.ndim == 1 else
                    f"mean image {list(mean.shape)} sha256 {hashlib.sha256(mean.tobytes()).hexdigest()[:16]}")
        return {"channels": self.channels, "resize": self.resize, "crop": self.crop, "mean": mean,
                "scale": self.scale}

    def load(self, path):
        """The CHW float32 input for one image file, or None when it cannot be read."""
        import cv2

        flag = cv2.IMREAD_COLOR if self.channels == 3 else cv2.IMREAD_GRAYSCALE
        image = cv2.imread(str(path), flag)
        if image is None:
            return None
        if self.resize and image.shape[:2] != tuple(self.resize):
            image = cv2.resize(image, (self.resize[1], self.resize[0]))  # bilinear, as ImageData and DSN
        image = image.reshape(image.shape[0], image.shape[1], self.channels).transpose(2, 0, 1)
        blob = image.astype(np.float32)
        if self.mean is not None:
            blob -= self._mean_for(blob.shape, path)
        if self.crop:
            # Caffe subtracts a mean file at the crop's offset, the same as subtracting before cropping
            top, left = (blob.shape[1] - self.crop[0]) // 2, (blob.shape[2] - self.crop[1]) // 2
            if top < 0 or left < 0:
                raise UserError(f"{path}: image {blob.shape[1]}x{blob.shape[2]} is smaller than the crop "
                                f"{self.crop[0]}x{self.crop[1]}")
            blob = blob[:, top:top + self.crop[0], left:left + self.crop[1]]
        return blob * np.float32(self.scale) if self.scale != 1 else blob

    def _mean_for(self, shape, path):
        mean = self.mean
        if mean.ndim == 1:
            return mean[:, None, None]
        if mean.shape != shape:
            raise UserError(f"{path}: the mean file is {list(mean.shape)} but the image is {list(shape)} "
                            "before cropping; use a mean file of the input size or --preprocess none")
        return mean


def find_mean_file(name, prototxt):
    """A mean_file named in a prototxt: as Caffe finds it (working directory), else from the repo."""
    for candidate in (Path(name), REPO / name):
        if candidate.is_file():
            return candidate
    raise UserError(f"mean file {name} (from {prototxt}) not found; give it with --mean-file")


def fixed_transform(fixed, input_shape, label):
    """A recipe's own transform (FixedTransform: resize, centre crop, BGR mean)."""
    if tuple(input_shape) != (3, fixed.crop, fixed.crop):
        raise UserError(f"{label} preprocessing makes 3x{fixed.crop}x{fixed.crop} inputs but the net takes "
                        f"{'x'.join(map(str, input_shape))}; use --recipe sse or none")
    return Transform(channels=3, resize=(fixed.resize, fixed.resize), crop=(fixed.crop, fixed.crop),
                     mean=np.array(fixed.mean, dtype=np.float32))


def data_layer_transform(deploy, input_shape, mean_file, label):
    """The transform of the TEST data layer in the test.prototxt beside the deploy file."""
    channels, height, width = input_shape
    test_file = Path(deploy).parent / "test.prototxt"
    layers = data_layers_in_test(read_net_param(test_file)) if test_file.is_file() else []
    if not layers and mean_file is None:
        raise UserError(f"{label} preprocessing takes the mean from {test_file}, which has no TEST data layer "
                        "or is missing; pass --mean-file, or use --recipe none")
    transform = layers[0].transform_param if layers else None
    images = layers[0].image_data_param if layers and layers[0].type == "ImageData" else None
    crop = (transform.crop_size,) * 2 if transform is not None and transform.crop_size else None
    resize = (images.new_height, images.new_width) if images is not None and images.new_height else None
    if crop is None and resize is None:
        resize = (height, width)  # the released test nets read faces already at the input size
    if mean_file is not None:
        mean = read_mean_file(mean_file)
    elif transform.mean_file:
        mean = read_mean_file(find_mean_file(transform.mean_file, test_file))
    else:
        mean = np.asarray(transform.mean_value, dtype=np.float32) if len(transform.mean_value) else None
    scale = transform.scale if transform is not None else 1.0
    return Transform(channels=channels, resize=resize, crop=crop, mean=mean, scale=float(scale))


def choose_transform(recipe, deploy, input_shape, mean_file=None):
    """The transform of a recipe (emotiw.recipes.Recipe), or a plain resize for None."""
    if recipe is None:
        label, chosen = "none", Transform(channels=input_shape[0], resize=tuple(input_shape[1:]))
    elif recipe.test_transform is not None:
        label, chosen = recipe.name, fixed_transform(recipe.test_transform, input_shape, recipe.name.upper())
    else:
        label, chosen = recipe.name, data_layer_transform(deploy, input_shape, mean_file, recipe.name.upper())
    out_size = chosen.crop or chosen.resize
    if out_size is not None and tuple(out_size) != tuple(input_shape[1:]):
        raise UserError(f"{label} preprocessing makes {out_size[0]}x{out_size[1]} inputs but the net takes "
                        f"{input_shape[1]}x{input_shape[2]}; use another --recipe")
    return chosen
