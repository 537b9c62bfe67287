"""Captioning models: load a Hugging Face-layout ONNX model directory and turn images into captions.

Public entry point: :func:`capwatch.models.captioner.open_captioner`.
"""
