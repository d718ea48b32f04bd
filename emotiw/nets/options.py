"""Generator options shared by every net builder. None means "the paper's default for this net"."""

from dataclasses import dataclass
from typing import Optional, Sequence

# What a builder is asked for: the train_val net (TRAIN and TEST data layers, losses), the test net
# (one pass over a list, for Caffe's extract_features) or the deploy net (an Input, prob).
MODES = ("train_val", "test", "deploy")


@dataclass(frozen=True)
class NetOptions:
    num_classes: int = 7
    input_size: Optional[int] = None          # crop/input side; DSN 224 (256 resize), SSE 128 or 224
    resize: Optional[int] = None              # ImageData new_height/new_width before cropping
    color: bool = True                        # False: 1-channel grayscale input
    mean_values: Optional[Sequence[float]] = None   # BGR means; exclusive with mean_file
    mean_file: Optional[str] = None
    train_batch: Optional[int] = None
    test_batch: Optional[int] = None
    train_source: Optional[str] = None        # ImageData list or LMDB path
    val_source: Optional[str] = None
    source_type: Optional[str] = None         # "list" (ImageData) or "lmdb" (Data layer)
    holonet_branch_outputs: int = 14          # the released HoloNet heads have 14; 7 is the fix
    # BatchNorm running averages: None keeps Caffe's 0.999 (the released nets); a short training
    # wants a smaller fraction, or the test nets' statistics still remember the first iterations
    bn_moving_average_fraction: Optional[float] = None
