"""MATLAB .mat files: v5 through scipy, v7.3 (HDF5) through h5py, for reading and writing."""

import time

import numpy as np

from emotiw.errors import UserError
from emotiw.formats.files import atomic_open, atomic_path

MAT_V5_LIMIT = 2**31 - 1          # bytes of one variable in a MATLAB v5 .mat
V73_USERBLOCK = 512               # MATLAB v7.3 files are HDF5 after a 512-byte user block
MATLAB_CLASSES = {"float64": "double", "float32": "single"}  # other numpy names are MATLAB's


def load_mat(path):
    """All variables of a .mat file; v7.3 files are HDF5 and are read with h5py."""
    import scipy.io

    try:
        try:
            return scipy.io.loadmat(path)
        except NotImplementedError:  # scipy's message for MATLAB v7.3
            return load_mat_v73(path)
    except Exception as error:  # scipy and h5py raise many kinds for damaged files
        raise UserError(f"{path}: not a readable .mat file ({error})") from None


def load_mat_v73(path):
    import h5py

    variables = {}
    with h5py.File(path, "r") as handle:
        for name, item in handle.items():
            if not isinstance(item, h5py.Dataset) or item.dtype.kind not in "iuf":
                continue
            # MATLAB stores column-major: an N x C matrix is an HDF5 dataset of shape C x N
            value = np.atleast_2d(np.asarray(item).T)
            if item.attrs.get("MATLAB_class", b"") in (b"char", "char"):
                # a char matrix holds one UTF-16 code unit per element, one string per row
                value = np.array(["".join(map(chr, row)).rstrip("\x00 ") for row in value])
            variables[name] = value
    return variables


def save_mat(path, variables, v73=False):
    """MATLAB v5 through scipy, or v7.3 (HDF5) for variables larger than v5 allows."""
    if v73:
        return save_mat_v73(path, variables)
    too_large = [name for name, value in variables.items() if np.asarray(value).nbytes > MAT_V5_LIMIT]
    if too_large:
        raise UserError(f"{', '.join(too_large)} is larger than a v5 .mat variable can be (2 GiB); pass --v73")
    import scipy.io

    with atomic_open(path, "wb") as handle:
        scipy.io.savemat(handle, variables)


def _v73_header():
    """The 128-byte MAT-file header MATLAB writes into the HDF5 user block."""
    text = (f"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: {time.strftime('%a %b %d %H:%M:%S %Y')} "
            "HDF5 schema 1.00 .")
    return text.encode("ascii").ljust(116, b" ") + bytes(8) + b"\x00\x02" + b"IM"


def _char_codes(strings):
    """A MATLAB char matrix (one space-padded row per string) as uint16 codes."""
    width = max(1, max(len(text) for text in strings))
    codes = np.asarray(strings, dtype=f"U{width}").view(np.uint32).reshape(len(strings), width)
    return np.where(codes == 0, ord(" "), codes).astype(np.uint16)


def save_mat_v73(path, variables):
    """HDF5 in MATLAB's v7.3 layout: column-major (datasets hold the transpose), MATLAB_class attributes."""
    import h5py

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", userblock_size=V73_USERBLOCK) as handle:
            for name, value in variables.items():
                value = np.asarray(value)
                if value.dtype.kind == "U":
                    dataset = handle.create_dataset(name, data=_char_codes(list(value)).T)
                    dataset.attrs["MATLAB_class"] = np.bytes_("char")
                    dataset.attrs["MATLAB_int_decode"] = np.int32(2)
                else:
                    dataset = handle.create_dataset(name, data=np.atleast_2d(value).T)
                    dataset.attrs["MATLAB_class"] = np.bytes_(MATLAB_CLASSES.get(value.dtype.name, value.dtype.name))
        with open(tmp, "r+b") as raw:
            raw.write(_v73_header())
