"""Fixtures several test modules use: a tiny ImageData net with its weights and clips (extract, Ray),
and a tiny DSN-sized deploy net with a video list (test, Ray)."""

import cv2
import numpy as np
import pytest
from helpers import CLIP_FRAMES, MEAN, SIDE, L, caffe, deploy_net, make_clips, tiny_net, write_list


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """net/{test,deploy}.prototxt (ImageData reading a list that does not exist yet, as the registry's
    nets do), seeded weights, three clip folders of frames and their video list."""
    root = tmp_path_factory.mktemp("features")
    net_dir = root / "sse_tiny"
    net_dir.mkdir()
    data, _ = L.ImageData(source=str(root / "absent_list.txt"), batch_size=4, ntop=2,
                          transform_param=dict(mean_value=list(MEAN)))
    (net_dir / "test.prototxt").write_text(str(tiny_net(data)))
    deploy = net_dir / "deploy.prototxt"
    deploy.write_text(str(tiny_net(L.Input(shape=dict(dim=[1, 3, SIDE, SIDE])))))
    caffe.set_random_seed(0)
    weights = net_dir / "tiny.caffemodel"
    caffe.Net(str(deploy), caffe.TEST).save(str(weights))

    rng = np.random.default_rng(0)
    video_lines = []
    for clip, count in enumerate(CLIP_FRAMES):
        folder = root / "faces" / f"clip{clip}"
        folder.mkdir(parents=True)
        for frame in range(count):
            cv2.imwrite(str(folder / f"{frame:03d}.png"), rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8))
        video_lines.append(f"{folder} {clip + 2}")
    videos = root / "videos.txt"
    videos.write_text("\n".join(video_lines) + "\n")
    return {"root": root, "test": net_dir / "test.prototxt", "deploy": deploy, "weights": weights, "videos": videos}


@pytest.fixture(scope="module")
def dsn_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dsn")
    deploy, weights = deploy_net(root / "dsn_tiny", side=224, stride=4)
    lines = make_clips(root / "faces", [3, 2, 4, 1], size=(60, 50))
    return deploy, weights, write_list(root / "val_video.txt", lines)
