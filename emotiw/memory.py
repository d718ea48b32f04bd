"""What fits in this machine's memory: sizes a user picks (crop side, batch) are checked before
anything that large is allocated, so a typo is one line instead of a process the kernel kills."""

from emotiw.errors import UserError

SHARE = 0.5  # of the memory available now that one allocation may take


def available_bytes():
    """MemAvailable of /proc/meminfo, or None where there is no such file."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(nbytes, what, fix):
    """UserError when `nbytes` is over SHARE of the available memory; `what` names the allocation
    ("--size 100000 makes crops of ..."), `fix` says which option to lower."""
    available = available_bytes()
    if available is not None and nbytes > SHARE * available:
        raise UserError(f"{what} of {nbytes / 2**30:.1f} GiB, more than half of the {available / 2**30:.1f} GiB of "
                        f"memory available; {fix}")


def check_batch_fits(net_param, batch, option="--batch"):
    """check_fits for `batch` images through a deploy net: its blobs at batch 1 (Caffe's own shape
    rules, emotiw.caffe.shapes), times the batch. Nets whose shapes cannot be computed here pass."""
    import math

    from emotiw.caffe.shapes import infer

    try:
        blobs = infer(net_param).blobs.values()
    except UserError:
        return
    per_image = 4 * sum(math.prod(shape[1:]) for shape in blobs if len(shape) > 1)
    check_fits(batch * per_image, f"{option} {batch} makes blobs", f"lower {option}")
