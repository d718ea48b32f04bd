"""The registry's types: what the registry says of one net (NetEntry) and of its data layer's
transform (Preprocessing). Standalone, so that the modules that build the nets (dsn, sse, fer,
classifiers, data) and the registry (emotiw.nets) both import them from here."""

from dataclasses import dataclass
from typing import Callable, Mapping, Optional

from emotiw.nets.options import MODES, NetOptions


@dataclass(frozen=True)
class Preprocessing:
    """What the net's data layer does to an image (and what deploy-time code must do)."""
    input_size: int
    resize: Optional[int]          # resized to resize x resize first (aspect ratio ignored)
    crop: bool                     # random crop in training, centre crop in testing
    mirror: bool                   # random horizontal flips in training
    mean_values: Optional[tuple]   # BGR, subtracted; or a mean_file
    mean_file: Optional[str]
    scale: Optional[float]         # multiplier after the mean subtraction (None: none)
    channels: int = 3              # 0: the input is a feature vector of input_size values


@dataclass(frozen=True)
class NetEntry:
    name: str
    caffe_name: str                # the `name:` of its prototxts (NetParameter.name)
    recipe: Optional[str]          # how its faces are made (emotiw.recipes): "dsn", "sse", "fer2013";
    #                                None for the classifiers of feature vectors
    backbone: str
    variant: str
    released: bool                 # its prototxt was published with the paper
    preprocessing: Preprocessing
    pretrained: Optional[str]      # the file under models/pretrained/ the paper fine-tunes from
    builder: Callable              # (mode, NetOptions) -> NetParameter
    solver_values: Mapping         # SolverParameter fields, the released values

    def build(self, mode, options=None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        options = options or NetOptions()
        net = self.builder(mode, options)
        if options.bn_moving_average_fraction is not None:
            for layer in net.layer:
                if layer.type == "BatchNorm":
                    layer.batch_norm_param.moving_average_fraction = options.bn_moving_average_fraction
        return net
