"""Shot boundaries with PySceneDetect's ContentDetector, fed the frames we already decode.

PySceneDetect would otherwise open the video a second time through its own OpenCV or PyAV
reader; feeding it our kept frames keeps one decode and one frame numbering. Frames are shrunk
to about SHOT_WIDTH pixels wide first, as PySceneDetect's SceneManager does by default: the HSV
differences it thresholds barely change, and each frame costs under a millisecond.
"""

SHOT_THRESHOLD = 27.0  # ContentDetector's default: mean HSV change between frames, 0..255
MIN_SHOT_FRAMES = 15  # ContentDetector's default: cuts closer than this are merged
SHOT_WIDTH = 256


class ShotDetector:
    """Numbers the shots of one clip's kept frames, in order: `shot(index, rgb)` -> shot number."""

    def __init__(self, threshold=SHOT_THRESHOLD, min_frames=MIN_SHOT_FRAMES, frame_rate=25.0):
        from scenedetect import ContentDetector

        self.enabled = threshold > 0
        self.detector = ContentDetector(threshold=threshold or SHOT_THRESHOLD, min_scene_len=min_frames)
        self.frame_rate = float(frame_rate)
        self.position = 0  # kept frames seen: ContentDetector wants consecutive frame numbers
        self.current = 0

    def shot(self, rgb):
        """The shot of the next kept frame; a cut ContentDetector reports starts a new shot."""
        import cv2
        from scenedetect.common import FrameTimecode

        if self.enabled:
            height, width = rgb.shape[:2]
            if width > SHOT_WIDTH:
                rgb = cv2.resize(rgb, (SHOT_WIDTH, max(1, round(height * SHOT_WIDTH / width))),
                                 interpolation=cv2.INTER_AREA)
            timecode = FrameTimecode(self.position, fps=self.frame_rate)
            self.current += len(self.detector.process_frame(timecode, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)))
        self.position += 1
        return self.current
