"""emotiw: DSN (EmotiW 2018) and SSE (EmotiW 2017) video emotion recognition on real BVLC Caffe."""

__version__ = "0.1.0"

# AFEW's class order, used everywhere a label is an integer (0..6).
EMOTIONS = ("Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise")
