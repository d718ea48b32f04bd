"""The data layers of the DSN and SSE nets.

`Inputs` holds what a net's released data layers state (its defaults); `resolve` applies the
NetOptions of one build and checks them, the mean included (a mean file, mean values, or the luma
of a default BGR mean for grayscale input). `add_data` writes the mode's layers: an Input in deploy,
else ImageData from an image list (resized, then cropped) or Data from an LMDB.
"""

import dataclasses
from typing import Optional

from emotiw.caffe.env import import_caffe
from emotiw.errors import UserError
from emotiw.nets.backbones import layers_and_params
from emotiw.nets.entry import Preprocessing

SOURCE_TYPES = ("list", "lmdb")


@dataclasses.dataclass(frozen=True)
class Inputs:
    """A net's input: the released defaults, or (from `resolve`) the values of one build."""
    input_size: int
    resize: Optional[int]          # images resized to resize x resize first (None: as they are)
    mean_values: Optional[tuple]   # BGR (one value for grayscale); exclusive with mean_file
    mean_file: Optional[str]
    train_source: str
    val_source: str
    test_source: str               # what the test net (for extract_features) reads
    train_batch: int
    val_batch: int
    test_batch: int
    source_type: str = "list"      # "list" (ImageData) or "lmdb" (Data)
    channels: int = 3
    crop: bool = True              # crop input_size always; False: only what a resize adds
    mirror: bool = True            # random flips of the training images
    val_shuffle: bool = False
    states_shuffle: bool = True    # ImageData writes `shuffle: false` too (the released DSN layers)
    test_reads_list: bool = False  # the test net reads an image list whatever the source type (SSE)
    scale: Optional[float] = None  # transform_param's multiplier after the mean (None: none)

    def resolve(self, options, mode):
        """These defaults overridden by the NetOptions fields that are not None, checked."""
        size = options.input_size or self.input_size
        # a default resize keeps its ratio to the input size (DSN: 256 for a 224 crop)
        resize = options.resize or (round(size * self.resize / self.input_size) if self.resize else None)
        if resize is not None and resize < size:
            raise UserError(f"resize {resize} is smaller than the input size {size}; the crop needs "
                            "resize >= input size")
        source_type = options.source_type or self.source_type
        if source_type not in SOURCE_TYPES:
            raise UserError(f"unknown source type {source_type!r}; choose lmdb or list")
        lists_replace_lmdbs = source_type == "list" != self.source_type
        if lists_replace_lmdbs and mode == "train_val" and not (options.train_source and options.val_source):
            raise UserError("image-list training needs both a train list and a val list")
        channels = 3 if options.color else 1
        mean_values, mean_file = self._mean(options, channels)
        return dataclasses.replace(
            self, input_size=size, resize=resize, channels=channels, mean_values=mean_values,
            mean_file=mean_file, source_type=source_type,
            train_source=options.train_source or self.train_source,
            val_source=options.val_source or self.val_source,
            test_source=options.val_source or self.test_source,
            train_batch=options.train_batch or self.train_batch,
            val_batch=options.test_batch or self.val_batch,
            test_batch=options.test_batch or self.test_batch)

    def _mean(self, options, channels):
        """(mean_values, mean_file): the given file or values, else the defaults (a default BGR mean
        becomes its luma for grayscale input)."""
        if options.mean_file and options.mean_values:
            raise UserError("give either mean values or a mean file, not both")
        if options.mean_file:
            return None, options.mean_file
        values = options.mean_values
        if not values:
            if self.mean_file:
                return None, self.mean_file
            values = self.mean_values if channels == 3 or len(self.mean_values) == 1 else [gray_mean(self.mean_values)]
        if len(values) not in (1, channels):
            expected = "one mean value" if channels == 1 else f"one mean value or {channels}"
            raise UserError(f"{len(values)} mean values for a {channels}-channel input; give {expected}")
        return tuple(values), None

    @property
    def mean(self):
        """transform_param's mean_file or mean_value."""
        return {"mean_file": self.mean_file} if self.mean_file else {"mean_value": list(self.mean_values)}

    @property
    def crop_size(self):
        cropped = self.crop or (self.resize is not None and self.resize > self.input_size)
        return self.input_size if cropped else 0

    @property
    def data_shape(self):
        """(C, H, W) of one image, as shapes.infer takes it."""
        return self.channels, self.input_size, self.input_size

    def preprocessing(self):
        """The registry's Preprocessing of these inputs."""
        return Preprocessing(input_size=self.input_size, resize=self.resize, crop=self.crop,
                                  mirror=self.mirror, mean_values=self.mean_values,
                                  mean_file=self.mean_file, scale=self.scale, channels=self.channels)


def gray_mean(bgr):
    """The luma of a BGR mean, weighted as OpenCV's BGR-to-gray conversion."""
    blue, green, red = bgr
    return round(0.114 * blue + 0.587 * green + 0.299 * red, 3)


def input_layer(inputs):
    """The deploy nets' Input, one image."""
    L, _ = layers_and_params()
    return L.Input(input_param={"shape": {"dim": [1, *inputs.data_shape]}})


def data_layer(inputs, split, phase=None):
    """The data and label Tops of split "train", "val" or "test": ImageData (resize, then crop) from
    an image list, or Data from an LMDB; random crops and flips only in training."""
    L, P = layers_and_params()
    train = split == "train"
    source, batch = {"train": (inputs.train_source, inputs.train_batch),
                     "val": (inputs.val_source, inputs.val_batch),
                     "test": (inputs.test_source, inputs.test_batch)}[split]
    kwargs = {"ntop": 2, "transform_param": {"crop_size": inputs.crop_size,
                                             "mirror": inputs.mirror and train, **inputs.mean}}
    if inputs.scale is not None:
        kwargs["transform_param"]["scale"] = inputs.scale
    if phase is not None:
        kwargs["include"] = {"phase": phase}
    if inputs.source_type == "lmdb" and not (split == "test" and inputs.test_reads_list):
        return L.Data(data_param={"source": source, "batch_size": batch, "backend": P.Data.LMDB},
                      **kwargs)
    shuffle = train or (split == "val" and inputs.val_shuffle)
    image_param = {"source": source, "batch_size": batch}
    if shuffle or inputs.states_shuffle:
        image_param["shuffle"] = shuffle
    if inputs.resize:
        image_param.update(new_height=inputs.resize, new_width=inputs.resize)
    if inputs.channels == 1:
        image_param["is_color"] = False
    return L.ImageData(image_data_param=image_param, **kwargs)


def add_data(n, inputs, mode):
    """Adds the mode's `data` (and `label`) to NetSpec n: deploy an Input, test the test split (every
    image once, in list order), train_val the TRAIN split. Returns the train_val net's TEST layer
    (a NetSpec holds one writer of `data`), which `to_proto` puts second; else None."""
    caffe = import_caffe()
    if mode == "deploy":
        n.data = input_layer(inputs)
        return None
    if mode == "test":
        n.data, n.label = data_layer(inputs, "test")
        return None
    n.data, n.label = data_layer(inputs, "train", caffe.TRAIN)
    spec = caffe.NetSpec()
    spec.data, spec.label = data_layer(inputs, "val", caffe.TEST)
    return spec.to_proto().layer[0]


def to_proto(n, name, test_layer):
    """The NetParameter `name` of NetSpec n, with the TEST data layer from add_data second."""
    net = n.to_proto()
    net.name = name
    if test_layer is not None:
        net.layer.insert(1, test_layer)
    return net
