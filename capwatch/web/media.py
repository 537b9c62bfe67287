"""Playing a video on the photo page: the file streamed from one descriptor, with HTTP ``Range`` requests (browsers
seek in a video by asking for byte ranges; Safari plays nothing without them).

The file is opened as thumbnails open theirs: only a row's real path below a configured root (``servable``), and
here without following a link in its last component, without blocking (a FIFO swapped in opens at once) and kept
only when ``fstat`` says it is a regular file. Everything is then read from that descriptor, so what is sent is
the file that was checked, whatever happens to its name meanwhile.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

from starlette.responses import Response, StreamingResponse

#: Bytes per read while streaming.
CHUNK = 256 << 10
MEDIA_TYPES = {"mp4": "video/mp4", "m4v": "video/x-m4v", "mov": "video/quicktime", "webm": "video/webm",
               "mkv": "video/x-matroska", "3gp": "video/3gpp", "avi": "video/x-msvideo", "mts": "video/mp2t",
               "m2ts": "video/mp2t"}
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def media_type(path: str) -> str:
    """The Content-Type of a video by its suffix (application/octet-stream when unknown)."""
    return MEDIA_TYPES.get(path.rpartition(".")[2].lower(), "application/octet-stream")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range ``[start, end]`` (inclusive) a ``Range`` header asks for within ``size`` bytes; None
    for the whole file (no header, or several ranges: answered whole, which HTTP allows). Raises ValueError when
    the range cannot be satisfied (416)."""
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if match is None:
        return None  # a multi-range or foreign unit: the whole file is a valid answer
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # the last N bytes
        length = int(last)
        if length == 0 or size == 0:
            raise ValueError("empty suffix range")
        return max(0, size - length), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        raise ValueError("range outside the file")
    return start, end


def _stream(fd: int, start: int, end: int) -> Iterator[bytes]:
    """Bytes ``[start, end]`` of ``fd``, read in chunks; closes ``fd`` when done or abandoned."""
    try:
        position = start
        while position <= end:
            chunk = os.pread(fd, min(CHUNK, end - position + 1), position)
            if not chunk:
                break  # the file shrank meanwhile: the client sees a short body
            position += len(chunk)
            yield chunk
    finally:
        os.close(fd)


def ranged_response(fd: int, path: str, range_header: str | None, if_range: str | None, etag: str) -> Response:
    """The response for a GET of the video open at ``fd``: 200 with the whole file, 206 with the one range asked
    for, or 416. Takes ownership of ``fd`` (closed when the body is sent, or at once when there is none)."""
    size = os.fstat(fd).st_size
    headers = {"Accept-Ranges": "bytes", "ETag": etag, "Cache-Control": "private, max-age=3600"}
    if if_range is not None and if_range.strip() != etag:
        range_header = None  # the client's copy is of another version: send the whole file
    try:
        wanted = parse_range(range_header, size)
    except ValueError:
        os.close(fd)
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    if wanted is None:
        start, end, status = 0, size - 1, 200
    else:
        start, end = wanted
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(max(0, end - start + 1))
    if size == 0:
        os.close(fd)
        return Response(b"", status_code=200, headers=headers, media_type=media_type(path))
    return StreamingResponse(_stream(fd, start, end), status_code=status, headers=headers,
                             media_type=media_type(path))
