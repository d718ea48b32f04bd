"""`--net`: a registered name or a prototxt path, resolved once into the files and the registry entry.

A registered name NAME reads prototxt/NAME/<mode>.prototxt. A prototxt path is used as it is; its
registry entry, if any, is found from the `name:` the net carries (nets that `emotiw nets` or
`emotiw train` wrote keep the registry's), never from the folder it lies in.
"""

import difflib
from dataclasses import dataclass
from pathlib import Path

from emotiw import nets
from emotiw.caffe.proto import read_net_param
from emotiw.caffe.shapes import infer
from emotiw.errors import UserError
from emotiw.paths import PROTOTXT_DIR

# The backend `make bench` measured faster on the CPU at batch 1 and 32, per backbone (bench/NOTES.md
# 20): pycaffe (our Caffe patches, MKL, BatchNorm folded) for the ResNets, DenseNet and HoloNet,
# OpenCV's own 3x3 kernels for the VGG nets and mini-Xception. Nets outside the registry run on
# pycaffe, the reference.
FASTER_BACKEND = {"ResNet": "pycaffe", "VGG-Face": "opencv", "DenseNet": "pycaffe", "HoloNet": "pycaffe",
                  "mini-Xception": "opencv", "linear SVM": "pycaffe", "MLP": "pycaffe"}


@dataclass(frozen=True)
class NetRef:
    name: str          # the registry name, else the prototxt's `name:` or file stem
    file: Path         # the prototxt for the mode asked for
    entry: object      # the NetEntry, or None for a net outside the registry

    @property
    def folder(self):
        return self.file.parent

    def sibling(self, mode):
        """prototxt/NAME/<mode>.prototxt beside this file, or None."""
        path = self.folder / f"{mode}.prototxt"
        return path if path.is_file() else None

    @property
    def recipe(self):
        """The recipe the net's faces are made by (emotiw.recipes), or None (feature classifiers): the
        registry's, else an SSE one when the net's name says so (sse_...) and DSN's otherwise."""
        if self.entry is not None:
            return self.entry.recipe
        return "sse" if self.name.startswith("sse_") else "dsn"

    def param_shapes(self):
        """{layer: [parameter shape, ...]} of the net, computed without Caffe: what a caffemodel must match."""
        return infer(read_net_param(self.file)).params

    @property
    def preferred_backend(self):
        if self.entry is None:
            return "pycaffe"
        return next(backend for family, backend in FASTER_BACKEND.items() if self.entry.backbone.startswith(family))


def resolve_net(net, mode="deploy"):
    """The NetRef of `--net` for mode "deploy" or "test"."""
    path = Path(net)
    if path.suffix == ".prototxt" or path.is_file():
        if not path.is_file():
            raise UserError(f"net file {path} not found")
        param = read_net_param(path)
        entry = nets.by_caffe_name(param.name) if param.name else None
        return NetRef(name=entry.name if entry else (param.name or path.stem), file=path, entry=entry)
    entry = nets.get(str(net)) if str(net) in nets.NETS else None
    generated = PROTOTXT_DIR / str(net) / f"{mode}.prototxt"
    if entry is None and not generated.is_file():
        close = difflib.get_close_matches(str(net), nets.NETS, n=3)
        raise UserError(f"no net '{net}': it is neither a registered name nor a prototxt file (no {generated})"
                        + (f"; did you mean {', '.join(close)}?" if close else "")
                        + "; `emotiw nets --list` lists the registered nets")
    if not generated.is_file():
        raise UserError(f"no {mode}.prototxt for net '{net}' ({generated} is missing); "
                        "write it with `emotiw nets`, or pass a prototxt path")
    return NetRef(name=str(net), file=generated, entry=entry)
