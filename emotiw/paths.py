"""The folders of the emotiw checkout the package uses: the generated nets and the converted models."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTOTXT_DIR = REPO / "prototxt"  # `emotiw nets` writes prototxt/<net>/<mode>.prototxt here
MODELS_DIR = REPO / "models"      # make install converts MTCNN's and the FER model's weights here
