"""capwatch: keep a photo library auto-captioned with a local ONNX model."""

__version__ = "0.1.0"
