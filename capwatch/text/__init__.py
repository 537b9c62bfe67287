"""Text in images (OCR) behind one small interface.

* :class:`~capwatch.text.reader.TextReader`: ``read(image) -> str`` for a decoded image, ``read_file(path) -> str``
  for a file (draft-decoded, EXIF-oriented, at most ``[ocr] max_pixels``); "" when the image holds no text.
* :func:`~capwatch.text.reader.open_text_reader`: the engine ``[ocr] engine`` names, None for "off".

* :class:`~capwatch.text.threaded.OffThreadReader`: an engine on a thread of its own (``capwatch-ocr``), so the
  captioning model never waits while text is read; reads can be queued ahead (``read_ahead``).

Engines: ``rapidocr`` (PP-OCR detection + recognition ONNX models shipped in the PyPI wheel, extra ``capwatch[ocr]``,
:mod:`capwatch.text.rapid`) and ``florence`` (Florence-2's ``<OCR>`` task, :mod:`capwatch.text.florence`). With
``florence`` the text is best produced in the caption's own pass (``DescribeOptions(text=True)``: the image features
are shared); the reader is for reading text alone.
"""

from capwatch.text.reader import TextReader, load_for_text, open_text_reader

__all__ = ["TextReader", "load_for_text", "open_text_reader"]
