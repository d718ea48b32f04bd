"""emotiw.face.video on clips encoded by the test with PyAV (H.264 and HEVC in mp4/mov/mkv, MPEG-4 in
avi; variable frame rates, rotation metadata) and on broken files."""

import shutil
import subprocess

import cv2
import media
import numpy as np
import pytest

from emotiw.errors import UserError
from emotiw.face.video import VideoError, display_size, iter_frames, probe, write_dsn_frames, write_video

FRAMES = 10


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    images, _ = media.moving_face_frames(FRAMES)
    paths = {suffix: media.write_video(folder / f"face{suffix}", images) for suffix in (".mp4", ".avi")}
    paths["wide"] = media.write_video(folder / "wide.avi", images, sample_aspect_ratio="4/3")
    return folder, paths, images


@pytest.mark.parametrize("suffix", [".mp4", ".avi"])
def test_every_frame_decodes_with_its_timestamp(clips, suffix):
    _, paths, images = clips
    frames = list(iter_frames(paths[suffix]))
    assert [f.index for f in frames] == list(range(FRAMES))
    assert [f.time for f in frames] == pytest.approx([i / media.FPS for i in range(FRAMES)], abs=1e-6)
    for frame, original in zip(frames, images):
        assert frame.image.shape == original.shape and frame.image.dtype == np.uint8
        # lossy codecs: close to what was encoded, and in RGB order (swapped channels would not be)
        assert np.abs(frame.image.astype(int) - original).mean() < 8


@pytest.mark.parametrize("options, expected", [
    ({"every": 3}, [0, 3, 6, 9]),
    ({"fps": 5}, [0, 2, 4, 6, 8]),
    ({"fps": 3}, [0, 4, 7]),  # first frames at or after 0, 1/3, 2/3 s
    ({"max_frames": 4}, [0, 1, 2, 3]),
    ({"every": 2, "max_frames": 3}, [0, 2, 4]),
])
def test_subsampling_keeps_the_right_frames(clips, options, expected):
    _, paths, _ = clips
    frames = list(iter_frames(paths[".mp4"], **options))
    assert [f.index for f in frames] == expected
    assert [f.time for f in frames] == pytest.approx([i / media.FPS for i in expected], abs=1e-6)


def test_display_aspect_ratio_is_honoured(clips):
    _, paths, _ = clips
    info = probe(paths["wide"])
    assert (info.width, info.height, info.declared_frames) == (320, 240, FRAMES)
    assert info.display_aspect_ratio == pytest.approx(320 / 240 * 4 / 3)
    frame = next(iter_frames(paths["wide"]))
    assert frame.image.shape == (240, round(320 * 4 / 3), 3)
    frame = next(iter_frames(paths["wide"], width=1024))
    assert frame.image.shape == (int(1024 / (16 / 9)), 1024, 3)


def test_dsn_frames_are_every_frame_1024_wide_like_extract_frames(clips, tmp_path):
    _, paths, _ = clips
    assert write_dsn_frames(paths[".avi"], tmp_path / "ours", 1024) == FRAMES
    names = sorted(p.name for p in (tmp_path / "ours").iterdir())
    assert names == [f"face-{i:03d}.png" for i in range(1, FRAMES + 1)]
    assert cv2.imread(str(tmp_path / "ours" / names[0])).shape == (768, 1024, 3)
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed; the comparison with DSN's exact command needs it")
    (tmp_path / "ffmpeg").mkdir()
    # extract_frames.py's command line
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(paths[".avi"]), "-s", "1024x768", "-qscale", "1",
                    str(tmp_path / "ffmpeg" / "face-%3d.png")], check=True)
    assert sorted(p.name for p in (tmp_path / "ffmpeg").iterdir()) == names
    for name in names:
        ours = cv2.imread(str(tmp_path / "ours" / name)).astype(int)
        theirs = cv2.imread(str(tmp_path / "ffmpeg" / name)).astype(int)
        assert np.abs(ours - theirs).mean() < 1.0


def test_broken_files_raise_a_clear_error(clips, tmp_path):
    _, paths, _ = clips
    empty = tmp_path / "empty.mp4"
    empty.touch()
    text = tmp_path / "notes.avi"
    text.write_text("not a video\n")
    cases = {
        empty: "empty file",
        media.corrupt_file(tmp_path / "random.mp4"): "not a video",
        text: "not a video",
        media.truncated_copy(paths[".mp4"], tmp_path / "cut.mp4"): "truncated or damaged MP4/QuickTime file",
        media.truncated_copy(paths[".avi"], tmp_path / "cut.avi", keep=0.6): "truncated",
        tmp_path / "missing.avi": "no such file",
    }
    for path, message in cases.items():
        with pytest.raises(VideoError, match=message):
            list(iter_frames(path))


def psnr(decoded, original):
    mse = np.mean((decoded.astype(float) - original) ** 2)
    return 10 * np.log10(255 ** 2 / mse)


@pytest.mark.parametrize("suffix", [".mp4", ".mov", ".mkv"])
@pytest.mark.parametrize("codec", ["h264", "hevc"])
def test_h264_and_hevc_decode_close_to_what_was_written_and_encode_deterministically(clips, tmp_path, suffix, codec):
    import av

    _, _, images = clips
    path = write_video(tmp_path / f"clip{suffix}", images, codec=codec)
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == codec
    frames = list(iter_frames(path))
    assert len(frames) == FRAMES
    assert min(psnr(f.image, original) for f, original in zip(frames, images)) > 30
    again = write_video(tmp_path / f"again{suffix}", images, codec=codec)
    assert again.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("suffix", [".mp4", ".mov", ".mkv"])
def test_variable_frame_rate_times_are_read_back(clips, tmp_path, suffix):
    _, _, images = clips
    times = [0, 0.04, 0.1, 0.25, 0.2512, 0.5, 1.0, 1.0333, 1.7, 3.0]
    path = write_video(tmp_path / f"vfr{suffix}", images, times=times, codec="hevc" if suffix == ".mov" else None)
    frames = list(iter_frames(path))
    assert [f.index for f in frames] == list(range(FRAMES))
    assert [f.time for f in frames] == pytest.approx(times, abs=1e-3)
    assert [f.index for f in iter_frames(path, fps=2)] == [0, 5, 6, 8, 9]  # first frames at or after 0, 0.5, 1, 1.5, 3 s


@pytest.fixture(scope="module")
def upright():
    """An asymmetric picture, 320 wide and 240 tall: the astronaut's head left of centre on coffee."""
    images, _ = media.moving_face_frames(1)
    return images[0]


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotated_clips_come_out_upright_as_players_and_opencv_show_them(upright, tmp_path, rotation):
    # stored turned clockwise by `rotation`: the metadata says to turn it back counter-clockwise
    stored = np.ascontiguousarray(np.rot90(upright, -rotation // 90))
    path = write_video(tmp_path / "turned.mp4", [stored] * 3, rotation=rotation)
    info = probe(path)
    assert (info.width, info.height, info.rotation) == (stored.shape[1], stored.shape[0], rotation)
    assert info.source_size == display_size(info) == (320, 240)
    frames = list(iter_frames(path))
    assert len(frames) == 3
    assert frames[0].image.shape == upright.shape
    assert psnr(frames[0].image, upright) > 30
    assert next(iter_frames(path, width=160)).image.shape == (120, 160, 3)
    ok, bgr = cv2.VideoCapture(str(path)).read()  # OpenCV turns frames by the same metadata
    assert ok and np.abs(bgr[:, :, ::-1].astype(int) - frames[0].image).mean() < 1.0
    if shutil.which("ffmpeg") is None:
        return
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(path), "-frames:v", "1", str(tmp_path / "ffmpeg.png")],
                   check=True)  # ffmpeg's default autorotation
    ours = cv2.imread(str(tmp_path / "ffmpeg.png"))[:, :, ::-1].astype(int)
    assert np.abs(ours - frames[0].image).mean() < 1.0


def test_rotation_turns_the_display_aspect_ratio_too(upright, tmp_path):
    stored = np.ascontiguousarray(np.rot90(upright, -1))[:, :160]  # 160 x 320 stored, shown 2:1 wide
    path = write_video(tmp_path / "wide.mkv", [stored], rotation=90, sample_aspect_ratio=2)
    info = probe(path)
    assert (info.width, info.height, info.display_aspect_ratio) == (160, 320, 1)
    assert (info.source_size, display_size(info)) == ((320, 160), (320, 320))
    path = write_video(tmp_path / "wide.mov", [stored], rotation=-90, sample_aspect_ratio=2)
    assert probe(path).rotation == 270
    assert next(iter_frames(path)).image.shape == (320, 320, 3)


@pytest.mark.parametrize("name, options, message", [
    ("clip.avi", {"codec": "hevc"}, "use .mp4 or .mov or .mkv"),
    ("clip.mp4", {"codec": "vp9"}, "use one of h264, hevc"),
    ("clip.mp4", {"times": [0, 0.1, 0.1, 0.3]}, "at least 1 ms after"),
    ("clip.mp4", {"times": [0, 0.1]}, "got 2 times for 4 frames"),
    ("clip.mp4", {"rotation": 45}, "not a quarter turn"),
    ("clip.avi", {"rotation": 90}, "AVI has neither"),
    ("clip.avi", {"times": [0, 0.1, 0.2, 0.3]}, "AVI has neither"),
    ("clip.avi", {"audio": np.zeros(1600)}, "sound into .mp4, .mov or .mkv only"),
])
def test_what_a_container_cannot_store_is_refused(upright, tmp_path, name, options, message):
    with pytest.raises(UserError, match=message):
        write_video(tmp_path / name, [upright] * 4, **options)
    assert not (tmp_path / name).exists()


@pytest.mark.parametrize("suffix", [".mp4", ".mov", ".mkv"])
def test_a_sound_track_is_written_beside_the_frames_deterministically(upright, tmp_path, suffix):
    from emotiw.descriptors.audio import decode_audio

    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)  # 1 s at 8 kHz
    first = write_video(tmp_path / f"a{suffix}", [upright] * 10, audio=tone, audio_rate=8000)
    second = write_video(tmp_path / f"b{suffix}", [upright] * 10, audio=tone, audio_rate=8000)
    assert first.read_bytes() == second.read_bytes()
    assert len(list(iter_frames(first))) == 10
    sound = decode_audio(first, rate=8000)
    assert abs(len(sound) - len(tone)) <= 2048  # AAC's priming and padding
    spectrum = np.abs(np.fft.rfft(sound[:8000]))
    assert abs(np.argmax(spectrum) * 8000 / len(sound[:8000]) - 440) < 5  # the tone, at its pitch
