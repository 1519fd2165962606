"""Weight-set specific stages of latentsync_core.face.detect.FaceDetector."""
