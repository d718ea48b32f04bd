"""Decoding video clips into RGB frames with PyAV (FFmpeg in a wheel), and encoding test clips.

Frames come out as players show them: at the display aspect ratio (the stored width is stretched
by the sample aspect ratio, as players and ffmpeg's `-s` sizes do) and upright (turned by the
display matrix's rotation, as players, ffmpeg's autorotation and OpenCV's VideoCapture do), each
with its index in the full decoded sequence and its presentation time in seconds from the first
frame's.

Sizes of a clip, from `info = probe(path)`: `info.width, info.height` is the stored (coded)
picture; `info.rotation` the display rotation in counter-clockwise degrees (0, 90, 180 or 270;
PyAV's VideoFrame.rotation and ffprobe's `rotation`, modulo 360); `info.source_size` the coded
size once upright (what OpenCV's VideoCapture returns); `display_size(info)` the display aspect
ratio at the stored height, once upright (what iter_frames yields).
"""

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from emotiw.errors import UserError
from emotiw.formats.files import atomic_open, atomic_path
from emotiw.formats.images import check_image_header, check_pixels


class VideoError(UserError):
    """A clip FFmpeg cannot read completely: missing, empty, not a video, truncated or damaged."""


@dataclass(frozen=True)
class Frame:
    index: int  # position in the full decoded sequence, 0-based, before any subsampling
    time: float  # seconds since the first frame's presentation time
    image: object  # RGB uint8 array, H x W x 3, at the display aspect ratio, upright


@dataclass(frozen=True)
class VideoInfo:
    width: int  # stored (coded) size, before the rotation
    height: int
    display_aspect_ratio: Fraction  # of the stored picture, before the rotation
    frame_rate: Fraction | None
    declared_frames: int  # what the container says; 0 when it does not say
    rotation: int  # counter-clockwise degrees that turn the stored picture upright: 0, 90, 180 or 270

    @property
    def source_size(self):
        """(width, height) of the coded picture once upright: what OpenCV's VideoCapture returns."""
        return (self.height, self.width) if self.rotation % 180 else (self.width, self.height)


# How common video containers begin: (kind, offset, bytes). A file that begins like one but that
# FFmpeg cannot open was cut short or damaged; it is no other kind of file.
VIDEO_SIGNATURES = (("MP4/QuickTime", 4, b"ftyp"), ("MP4/QuickTime", 4, b"moov"), ("MP4/QuickTime", 4, b"mdat"),
                    ("AVI", 8, b"AVI "), ("Matroska/WebM", 0, b"\x1a\x45\xdf\xa3"), ("FLV", 0, b"FLV"),
                    ("ASF/WMV", 0, b"\x30\x26\xb2\x75\x8e\x66\xcf\x11"), ("MPEG-PS", 0, b"\x00\x00\x01\xba"),
                    ("Ogg", 0, b"OggS"))


def _container_kind(path):
    """The kind of video container the file's first bytes announce, or None."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError:
        return None
    return next((kind for kind, offset, magic in VIDEO_SIGNATURES if head[offset:offset + len(magic)] == magic), None)


def _open(path):
    import av

    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: empty file (0 bytes)")
    try:
        check_image_header(path)  # a still image given as a clip: its codec size shows only once decoded
    except UserError as error:
        raise VideoError(str(error)) from None
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as error:
        kind = _container_kind(path)
        if kind:
            raise VideoError(f"{path}: truncated or damaged {kind} file: FFmpeg cannot open it "
                             f"({error.strerror or error}); copy or download it again")
        raise VideoError(f"{path}: not a video FFmpeg can read ({error.strerror or error})")
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: the file has no video stream")
    context = container.streams.video[0].codec_context
    try:
        check_pixels(context.width, context.height)  # before a frame of that size is decoded
    except UserError as error:
        container.close()
        raise VideoError(f"{path}: {error}") from None
    return container


def _info(stream, rotation):
    width, height = stream.codec_context.width, stream.codec_context.height
    sample_aspect = stream.sample_aspect_ratio or Fraction(1)  # 0/1 or None: square pixels
    return VideoInfo(
        width=width,
        height=height,
        display_aspect_ratio=Fraction(width, height) * sample_aspect,
        frame_rate=stream.average_rate or stream.guessed_rate,
        declared_frames=stream.frames or 0,
        # PyAV gives -180..180; players snap a display matrix to the nearest quarter turn
        rotation=round(rotation / 90) % 4 * 90,
    )


def probe(path):
    """Stream facts of a clip's first video stream. Decodes the first frame only: PyAV exposes the
    display matrix (the rotation) on decoded frames, not on the stream."""
    import av

    with _open(path) as container:
        stream = container.streams.video[0]
        try:
            first = next(iter(container.decode(stream)), None)
        except av.error.FFmpegError as error:
            raise VideoError(f"{path}: damaged video, its first frame does not decode ({error})")
        if first is None:
            raise VideoError(f"{path}: no frame could be decoded")
        return _info(stream, first.rotation)


def display_size(info, width=None):
    """Output (width, height) of upright frames: the display aspect ratio at the stored height,
    turned with a 90 or 270 degree rotation; or `width` wide at the upright display aspect ratio.

    With a width, the height is int(width / DAR), as DSN's extract_frames.py computed it.
    """
    aspect = info.display_aspect_ratio
    if width is not None:
        return width, int(width * aspect if info.rotation % 180 else width / aspect)
    size = round(info.height * aspect), info.height
    return size[::-1] if info.rotation % 180 else size


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
        stream.thread_type = "AUTO"  # frame threads too: 1080p H.264 decodes 1.6x faster on 2 cores
        info = None
        first_pts = None
        decoded = 0
        try:
            for decoded_frame in container.decode(stream):
                if info is None:  # the rotation comes with the first decoded frame
                    info = _info(stream, decoded_frame.rotation)
                    turns = info.rotation // 90
                    out_width, out_height = display_size(info, width)
                    if turns % 2:  # scaled before it is turned
                        out_width, out_height = out_height, out_width
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
                image = np.ascontiguousarray(np.rot90(rgb.to_ndarray(), turns))  # rot90 turns counter-clockwise
                yield Frame(index=index, time=time, image=image)
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


def write_dsn_frames(path, out_dir, width):
    """DSN's extract_frames.py (`ffmpeg -i clip.avi -s 1024x<1024/DAR> -qscale 1 <name>-%3d.png`):
    every frame, `width` wide at the display aspect ratio, as `<out_dir>/<clip>-001.png`, `-002.png`,
    ... (ffmpeg's `%3d` numbering starts at 1).

    Returns the number of frames written. Scaling is bicubic, ffmpeg's default for `-s`.
    """
    written = 0
    for frame in iter_frames(path, width=width):
        save_png(Path(out_dir) / f"{Path(path).stem}-{frame.index + 1:03d}.png", frame.image)
        written += 1
    return written


# suffix -> (container format, the codecs it takes, the first being the default)
CONTAINERS = {".mp4": ("mp4", ("h264", "hevc")), ".mov": ("mov", ("h264", "hevc")),
              ".mkv": ("matroska", ("h264", "hevc")), ".avi": ("avi", ("mpeg4",))}
# codec -> (encoder, its options). A constant quantiser on one thread: libx264's CRF rate control
# gave different streams for the same frames depending on what the process had encoded before.
# x265 threads through its own pool (pools=none turns it off) and logs to stderr unless told not to.
ENCODERS = {
    "h264": ("libx264", {"qp": "20", "preset": "medium"}),
    "hevc": ("libx265", {"qp": "20", "preset": "medium",
                         "x265-params": "log-level=none:pools=none:frame-threads=1"}),
    "mpeg4": ("mpeg4", {}),
}
TIME_BASE = Fraction(1, 90000)  # of per-frame times: MPEG's 90 kHz clock (Matroska keeps 1 ms)


def _check_encoding(path, frames, codec, times, rotation):
    """The (container format, codec) for `path`; UserError for what it cannot store."""
    suffix = path.suffix.lower()
    if suffix not in CONTAINERS:
        raise UserError(f"{path}: cannot encode {suffix or 'files without a suffix'}; "
                        f"use one of {', '.join(CONTAINERS)}")
    container_format, codecs = CONTAINERS[suffix]
    codec = codecs[0] if codec is None else codec
    if codec not in codecs:
        fits = [name for name, (_, takes) in CONTAINERS.items() if codec in takes]
        raise UserError(f"{path}: {suffix} cannot hold {codec} video; "
                        + (f"use {' or '.join(fits)} for it" if fits else f"use one of {', '.join(ENCODERS)}"))
    if suffix == ".avi" and (times is not None or rotation):
        raise UserError(f"{path}: AVI has neither per-frame times nor a display rotation; use .mp4, .mov or .mkv")
    if times is not None:
        steps = np.diff(times)
        if len(times) != len(frames) or times[0] < 0 or (steps < 1e-3).any():
            raise UserError(f"{path}: times must be one per frame, at 0 s or later, each at least 1 ms "
                            f"after the one before (got {len(times)} times for {len(frames)} frames)")
    if rotation is not None and rotation % 90:
        raise UserError(f"{path}: rotation {rotation} is not a quarter turn; use 0, 90, 180 or 270 degrees")
    return container_format, codec


def write_video(path, frames, fps=10, sample_aspect_ratio=None, codec=None, times=None, rotation=None,
                audio=None, audio_rate=16000):
    """Encodes RGB frames with PyAV, written atomically: H.264 (default) or HEVC (`codec="hevc"`)
    in .mp4/.mov/.mkv, MPEG-4 part 2 in .avi. The same frames and settings give the same bytes.

    `times`: per-frame presentation times in seconds (variable frame rate) instead of 1/fps steps;
    `fps` is then only the nominal rate the encoder is told. `rotation`: the display matrix's
    counter-clockwise degrees (what probe reads back), so players turn the stored frames by it.
    `audio`: mono float samples in -1..1 at `audio_rate` Hz, stored as an AAC track (not in .avi).
    """
    import av

    path = Path(path)
    container_format, codec = _check_encoding(path, frames, codec, times, rotation)
    if audio is not None and container_format == "avi":
        raise UserError(f"{path}: emotiw writes sound into .mp4, .mov or .mkv only; use one of those")
    encoder, options = ENCODERS[codec]
    with atomic_path(path) as tmp:
        # bitexact: no FFmpeg version in the file, and Matroska's UIDs fixed instead of random
        with av.open(str(tmp), "w", format=container_format, options={"fflags": "+bitexact"}) as container:
            stream = container.add_stream(encoder, rate=Fraction(fps))
            stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
            stream.pix_fmt = "yuv420p"
            stream.thread_count = 1
            stream.options = options
            if codec == "hevc" and container_format != "matroska":
                stream.codec_context.codec_tag = "hvc1"  # Apple's players refuse FFmpeg's default hev1
            if sample_aspect_ratio is not None:
                stream.codec_context.sample_aspect_ratio = Fraction(sample_aspect_ratio)
            if rotation:
                stream.set_display_rotation(rotation % 360)
            if times is not None:
                stream.codec_context.time_base = stream.time_base = TIME_BASE
            if audio is not None:  # every stream is added before the first packet
                sound = container.add_stream("aac", rate=audio_rate)
                sound.layout = "mono"
            for number, image in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                if times is not None:
                    frame.pts, frame.time_base = round(times[number] / TIME_BASE), TIME_BASE
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
            if audio is not None:
                _mux_audio(container, sound, np.asarray(audio, dtype=np.float32).reshape(-1), audio_rate)
    return path


def _mux_audio(container, stream, samples, rate):
    import av

    chunk = 1024  # AAC's frame size
    for start in range(0, len(samples), chunk):
        frame = av.AudioFrame.from_ndarray(samples[None, start:start + chunk], format="fltp", layout="mono")
        frame.sample_rate, frame.pts = rate, start
        container.mux(stream.encode(frame))
    container.mux(stream.encode())
