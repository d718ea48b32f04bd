"""A clip's audio track -> openSMILE functionals (the EmotiW audio baseline's recipe).

The first audio stream is decoded with PyAV and resampled to 16 kHz mono float; openSMILE (the
`opensmile` package, research and non-commercial licence) computes one vector of functionals over
the whole clip: eGeMAPSv02 (88 values) by default, ComParE_2016 (6373) or emobase (988).
"""

import numpy as np

from emotiw.errors import UserError

RATE = 16000
FEATURE_SETS = ("eGeMAPSv02", "ComParE_2016", "emobase")
SILENCE_RMS = 1e-4  # below this root mean square (full scale 1.0) a track holds no sound to describe


def decode_audio(path, rate=RATE):
    """The first audio stream of `path` as float32 mono samples at `rate` Hz."""
    import av

    from emotiw.face.video import VideoError

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as error:
        raise VideoError(f"{path}: not a file FFmpeg can read ({error})") from None
    with container:
        if not container.streams.audio:
            raise UserError(f"{path}: the clip has no audio stream")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        chunks = []
        try:
            for frame in container.decode(container.streams.audio[0]):
                chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
        except av.error.FFmpegError as error:
            raise VideoError(f"{path}: damaged audio, decoding stopped ({error})") from None
        chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    if not chunks:
        raise UserError(f"{path}: its audio stream holds no samples")
    return np.concatenate(chunks).astype(np.float32)


class AudioDescriptor:
    """openSMILE functionals of one feature set; `names` gives the columns."""

    def __init__(self, feature_set="eGeMAPSv02"):
        import opensmile

        if feature_set not in FEATURE_SETS:
            raise UserError(f"unknown audio feature set {feature_set!r}; choose one of {', '.join(FEATURE_SETS)}")
        self.feature_set = feature_set
        self.smile = opensmile.Smile(feature_set=getattr(opensmile.FeatureSet, feature_set),
                                     feature_level=opensmile.FeatureLevel.Functionals)
        self.names = list(self.smile.feature_names)

    def __call__(self, path):
        """The functionals of the clip at `path`; UserError for no audio or silence only."""
        samples = decode_audio(path)
        if float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) < SILENCE_RMS:
            raise UserError(f"{path}: its audio track is silent")
        values = self.smile.process_signal(samples, RATE).to_numpy(dtype=np.float32).reshape(-1)
        if not np.all(np.isfinite(values)):
            raise UserError(f"{path}: openSMILE gave non-finite {self.feature_set} values")
        return values
