"""Read a SentencePiece model file (``source.spm``) without the sentencepiece library, as a ``tokenizers`` tokenizer.

A ``.spm`` file is a protobuf ``ModelProto``: field 1 repeated ``SentencePiece`` {1: piece, 2: score, 3: type}, field 3
``NormalizerSpec`` {1: name, 2: precompiled_charsmap, 3: add_dummy_prefix, 4: remove_extra_whitespaces}. A Unigram
model over those pieces, with SentencePiece's own normalization (the precompiled charsmap, runs of spaces collapsed)
and the ``▁`` word-boundary marker in front of every word, segments text as ``SentencePieceProcessor.encode`` does;
transformers' own converters build the same (convert_slow_tokenizer.SpmConverter).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

from capwatch.errors import ModelError
from capwatch.models.layout import MAX_TOKENIZER_BYTES, read_capped

#: SentencePiece piece types (sentencepiece_model.proto).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class SpmModel:
    """The parts of a SentencePiece model that segmenting needs."""

    pieces: tuple[tuple[str, float, int], ...]  # (piece, score, type)
    charsmap: bytes
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool

    @property
    def unk_id(self) -> int:
        return next((i for i, (_p, _s, kind) in enumerate(self.pieces) if kind == UNKNOWN), 0)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes) -> list[tuple[int, int, bytes | int]]:
    """(field number, wire type, value) of one protobuf message: bytes for length-delimited and 32-bit fields."""
    out: list[tuple[int, int, bytes | int]] = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            out.append((number, wire, value))
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise ValueError("truncated field")
            out.append((number, wire, data[pos : pos + length]))
            pos += length
        elif wire == 5:
            out.append((number, wire, data[pos : pos + 4]))
            pos += 4
        elif wire == 1:
            out.append((number, wire, data[pos : pos + 8]))
            pos += 8
        else:
            raise ValueError(f"unsupported wire type {wire}")
    return out


def parse_spm(data: bytes) -> SpmModel:
    """The pieces and normalizer of a serialized SentencePiece ModelProto. Raises ValueError when malformed."""
    pieces: list[tuple[str, float, int]] = []
    charsmap = b""
    dummy = extra = True
    for number, wire, value in _fields(data):
        if number == 1 and wire == 2 and isinstance(value, bytes):
            piece, score, kind = "", 0.0, NORMAL
            for n, w, v in _fields(value):
                if n == 1 and w == 2 and isinstance(v, bytes):
                    piece = v.decode("utf-8")
                elif n == 2 and w == 5 and isinstance(v, bytes):
                    score = struct.unpack("<f", v)[0]
                elif n == 3 and w == 0 and isinstance(v, int):
                    kind = v
            pieces.append((piece, score, kind))
        elif number == 3 and wire == 2 and isinstance(value, bytes):
            for n, w, v in _fields(value):
                if n == 2 and w == 2 and isinstance(v, bytes):
                    charsmap = v
                elif n == 3 and w == 0 and isinstance(v, int):
                    dummy = bool(v)
                elif n == 4 and w == 0 and isinstance(v, int):
                    extra = bool(v)
    if not pieces:
        raise ValueError("no pieces")
    return SpmModel(tuple(pieces), charsmap, dummy, extra)


def load_spm_tokenizer(path: Path) -> Tokenizer:
    """A tokenizer that segments as the SentencePiece model at ``path`` does (tokens are the pieces; unknown text
    comes out as the model's unknown piece). Raises ModelError (one line, naming the file) when it cannot be read."""
    try:
        model = parse_spm(read_capped(path, MAX_TOKENIZER_BYTES))
    except FileNotFoundError:
        raise ModelError(f"{path.parent}: missing {path.name}") from None
    except (ValueError, UnicodeDecodeError, struct.error) as exc:
        raise ModelError(f"{path}: not a SentencePiece model: {exc}") from None
    vocab = [(piece, score if kind in (NORMAL, USER_DEFINED) else 0.0) for piece, score, kind in model.pieces]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=model.unk_id, byte_fallback=False))
    steps: list[normalizers.Normalizer] = []
    if model.charsmap:
        steps.append(normalizers.Precompiled(model.charsmap))
    if model.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if steps:
        tokenizer.normalizer = normalizers.Sequence(steps)
    scheme = "always" if model.add_dummy_prefix else "never"
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme, split=False)
    return tokenizer
