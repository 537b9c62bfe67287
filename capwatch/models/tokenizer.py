"""Token ids -> text with the ``tokenizers`` library, from ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from capwatch.errors import ModelError
from capwatch.models.layout import MAX_TOKENIZER_BYTES, read_capped


class TextDecoder:
    """Decodes generated ids into a caption, dropping the model's special tokens."""

    def __init__(self, tokenizer: Tokenizer, special_ids: Iterable[int]) -> None:
        self._tokenizer = tokenizer
        self._special = frozenset(int(i) for i in special_ids)

    @classmethod
    def from_dir(cls, path: Path, special_ids: Iterable[int]) -> TextDecoder:
        """Load the tokenizer of the model directory ``path``.

        ``special_ids`` (decoder start, BOS, EOS, pad, ... from the model's configs) are always removed before
        decoding, even when a vocab.json/merges.txt tokenizer does not know them as special. Raises ModelError
        (one line, naming the file) when neither tokenizer.json nor vocab.json + merges.txt exists, a file is
        larger than :data:`~capwatch.models.layout.MAX_TOKENIZER_BYTES`, or it cannot be parsed (the tokenizers
        library refuses nesting deeper than 128 levels with an ordinary error).
        """
        tokenizer_json = path / "tokenizer.json"
        vocab, merges = path / "vocab.json", path / "merges.txt"
        source = tokenizer_json if tokenizer_json.is_file() else vocab  # named in the error message
        try:
            if tokenizer_json.is_file():
                # Read here, with the size cap, and parse the very bytes that were checked.
                tokenizer = Tokenizer.from_buffer(read_capped(tokenizer_json, MAX_TOKENIZER_BYTES))
            elif vocab.is_file() and merges.is_file():
                for name in (vocab, merges):
                    _check_size(name)
                # GPT-2 / BART style byte-level BPE, as transformers' slow tokenizers read these two files.
                tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
                tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
                tokenizer.decoder = decoders.ByteLevel()
            else:
                raise ModelError(f"{path}: missing tokenizer.json (or vocab.json + merges.txt)")
        except ModelError:
            raise
        except FileNotFoundError as exc:  # removed between is_file() and reading it
            raise ModelError(f"{exc.filename}: cannot read: file not found") from None
        except Exception as exc:  # tokenizers raises bare Exception subclasses from Rust
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelError(f"{source}: cannot load the tokenizer: {first}") from None
        return cls(tokenizer, special_ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Return the caption text for ``ids`` (special tokens dropped, surrounding whitespace stripped)."""
        kept = [int(i) for i in ids if int(i) not in self._special]
        text: str = self._tokenizer.decode(kept, skip_special_tokens=True)
        return text.strip()

    def decode_raw(self, ids: Sequence[int]) -> str:
        """Return ``ids`` decoded with every token kept, special ones included (``<s>``, ``</s>``, ``<loc_N>``), as
        transformers' ``batch_decode(..., skip_special_tokens=False)`` gives task outputs to its post-processor."""
        text: str = self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
        return text

    def encode(self, text: str) -> list[int]:
        """Return the token ids of ``text`` without special tokens added (used for task prompts)."""
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False).ids
        return ids


def _check_size(path: Path) -> None:
    """Raise ModelError when ``path`` (read by the tokenizers library itself) exceeds the tokenizer size cap."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ModelError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if size > MAX_TOKENIZER_BYTES:
        raise ModelError(f"{path}: too large (more than {MAX_TOKENIZER_BYTES} bytes allowed for this file)")
