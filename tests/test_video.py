"""emotiw.face.video on clips encoded by the test with PyAV (H.264/mp4, MPEG-4/avi) and on broken files."""

import shutil
import subprocess

import cv2
import media
import numpy as np
import pytest

from emotiw.face.video import VideoError, iter_frames, probe, write_dsn_frames

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
    assert write_dsn_frames(paths[".avi"], tmp_path / "ours") == FRAMES
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
        media.truncated_copy(paths[".mp4"], tmp_path / "cut.mp4"): "not a video",
        media.truncated_copy(paths[".avi"], tmp_path / "cut.avi", keep=0.6): "truncated",
        tmp_path / "missing.avi": "no such file",
    }
    for path, message in cases.items():
        with pytest.raises(VideoError, match=message):
            list(iter_frames(path))
