"""Decoding video clips into RGB frames with PyAV (FFmpeg in a wheel).

Frames come out at the display aspect ratio (the stored width is stretched by the sample aspect
ratio, as players and ffmpeg's `-s` sizes do), each with its index in the full decoded sequence and
its presentation time in seconds from the start of the stream.
"""

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from emotiw.errors import UserError
from emotiw.formats.files import atomic_open, atomic_path

# DSN's extract_frames.py: `ffmpeg -i clip.avi -s 1024x<1024/DAR> -qscale 1 <name>-%3d.png`.
DSN_FRAME_WIDTH = 1024


class VideoError(UserError):
    """A clip FFmpeg cannot read completely: missing, empty, not a video, truncated or damaged."""


@dataclass(frozen=True)
class Frame:
    index: int  # position in the full decoded sequence, 0-based, before any subsampling
    time: float  # seconds since the first frame's presentation time
    image: object  # RGB uint8 array, H x W x 3, at the display aspect ratio


@dataclass(frozen=True)
class VideoInfo:
    width: int  # stored (coded) size
    height: int
    display_aspect_ratio: Fraction
    frame_rate: Fraction | None
    declared_frames: int  # what the container says; 0 when it does not say


def _open(path):
    import av

    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: empty file (0 bytes)")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as error:
        raise VideoError(f"{path}: not a video FFmpeg can read ({error.strerror or error})")
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: the file has no video stream")
    return container


def _info(stream):
    width, height = stream.codec_context.width, stream.codec_context.height
    sample_aspect = stream.sample_aspect_ratio or Fraction(1)  # 0/1 or None: square pixels
    return VideoInfo(
        width=width,
        height=height,
        display_aspect_ratio=Fraction(width, height) * sample_aspect,
        frame_rate=stream.average_rate or stream.guessed_rate,
        declared_frames=stream.frames or 0,
    )


def probe(path):
    """Stream facts of a clip's first video stream, without decoding it."""
    with _open(path) as container:
        return _info(container.streams.video[0])


def display_size(info, width=None):
    """Output (width, height): the display size, or `width` wide at the display aspect ratio.

    With a width, the height is int(width / DAR), as DSN's extract_frames.py computed it.
    """
    if width is not None:
        return width, int(width / info.display_aspect_ratio)
    return round(info.height * info.display_aspect_ratio), info.height


def check_sampling(fps=None, every=None, max_frames=None):
    if fps is not None and every is not None:
        raise UserError("--fps and --every both subsample frames; give only one of them")
    if (fps is not None and fps <= 0) or (every is not None and every < 1):
        raise UserError("--fps must be > 0 and --every >= 1")
    if max_frames is not None and max_frames < 1:
        raise UserError("--max-frames must be >= 1")


class _Sampler:
    """Decides which decoded frames to keep: every K-th, or N per second, at most a maximum."""

    def __init__(self, fps=None, every=None, max_frames=None):
        check_sampling(fps, every, max_frames)
        self.fps, self.every, self.max_frames = fps, every, max_frames
        self.kept = 0
        self.next_time = 0.0

    def done(self):
        return self.max_frames is not None and self.kept >= self.max_frames

    def keep(self, index, time):
        if self.every is not None:
            wanted = index % self.every == 0
        elif self.fps is not None:
            # The first frame at or after each tick of a 1/fps clock; the tolerance absorbs
            # timestamps rounded to the container's time base.
            wanted = time >= self.next_time - 1e-6
            if wanted:
                self.next_time = (math.floor(time * self.fps + 1e-6) + 1) / self.fps
        else:
            wanted = True
        if wanted:
            self.kept += 1
        return wanted


def iter_frames(path, fps=None, every=None, max_frames=None, width=None, interpolation="BICUBIC"):
    """Yields the kept Frames of a clip in order; raises VideoError for an unreadable clip.

    A clip that ends before the frame count its container declares is reported as truncated, so a
    damaged file is never mistaken for a short one.
    """
    import av

    sampler = _Sampler(fps, every, max_frames)
    with _open(path) as container:
        stream = container.streams.video[0]
        info = _info(stream)
        out_width, out_height = display_size(info, width)
        first_pts = None
        decoded = 0
        try:
            for decoded_frame in container.decode(stream):
                index = decoded
                decoded += 1
                if decoded_frame.pts is not None:
                    first_pts = decoded_frame.pts if first_pts is None else first_pts
                    time = float((decoded_frame.pts - first_pts) * decoded_frame.time_base)
                else:  # some AVI muxers give no pts: fall back to the nominal frame rate
                    time = index / float(info.frame_rate or 25)
                if not sampler.keep(index, time):
                    continue
                rgb = decoded_frame.reformat(out_width, out_height, "rgb24", interpolation=interpolation)
                yield Frame(index=index, time=time, image=rgb.to_ndarray())
                if sampler.done():
                    return
        except av.error.FFmpegError as error:
            raise VideoError(f"{path}: damaged video, decoding stopped after {decoded} frames ({error})")
    if decoded == 0:
        raise VideoError(f"{path}: no frame could be decoded")
    if decoded < info.declared_frames:
        raise VideoError(f"{path}: truncated or damaged, decoded {decoded} of the "
                         f"{info.declared_frames} frames its container declares")


def save_png(path, image):
    """Writes an RGB (H x W x 3) or gray (H x W) uint8 image as PNG, atomically."""
    import cv2

    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, png = cv2.imencode(".png", image)
    if not ok:
        raise UserError(f"OpenCV could not encode {path} as PNG")
    with atomic_open(path, "wb") as handle:
        handle.write(png.tobytes())


def write_dsn_frames(path, out_dir):
    """DSN's extract_frames.py: every frame, DSN_FRAME_WIDTH wide at the display aspect ratio, as
    `<out_dir>/<clip>-001.png`, `-002.png`, ... (ffmpeg's `%3d` numbering starts at 1).

    Returns the number of frames written. Scaling is bicubic, ffmpeg's default for `-s`.
    """
    written = 0
    for frame in iter_frames(path, width=DSN_FRAME_WIDTH):
        save_png(Path(out_dir) / f"{Path(path).stem}-{frame.index + 1:03d}.png", frame.image)
        written += 1
    return written


# suffix -> (container format, video codec)
CONTAINERS = {".mp4": ("mp4", "libx264"), ".mov": ("mov", "libx264"), ".mkv": ("matroska", "libx264"),
              ".avi": ("avi", "mpeg4")}


def write_video(path, frames, fps=10, sample_aspect_ratio=None):
    """Encodes RGB frames with PyAV, written atomically: H.264 in .mp4/.mov/.mkv, MPEG-4 part 2 in .avi.
    H.264 uses a constant quantiser on one thread, because libx264's CRF rate control gave different
    streams for the same frames depending on what the process had encoded before."""
    import av

    path = Path(path)
    if path.suffix.lower() not in CONTAINERS:
        raise UserError(f"{path}: cannot encode {path.suffix or 'files without a suffix'}; "
                        f"use one of {', '.join(CONTAINERS)}")
    container_format, codec = CONTAINERS[path.suffix.lower()]
    with atomic_path(path) as tmp:
        with av.open(str(tmp), "w", format=container_format) as container:
            stream = container.add_stream(codec, rate=Fraction(fps))
            stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
            stream.pix_fmt = "yuv420p"
            stream.thread_count = 1
            if codec == "libx264":
                stream.options = {"qp": "20", "preset": "medium"}
            if sample_aspect_ratio is not None:
                stream.codec_context.sample_aspect_ratio = Fraction(sample_aspect_ratio)
            for image in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            container.mux(stream.encode())
    return path
