"""Importing pycaffe the same way everywhere: quiet glog by default, one clear error if missing."""

import os

from emotiw.errors import UserError


def import_caffe():
    # Caffe logs every layer at INFO through glog; users ask for it with GLOG_minloglevel=0.
    os.environ.setdefault("GLOG_minloglevel", "2")
    try:
        import caffe
    except ImportError as error:
        raise UserError(f"pycaffe is not importable ({error}); run `make install` in the emotiw checkout")
    return caffe
