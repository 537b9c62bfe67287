"""Token ids -> text with the ``tokenizers`` library, from ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from capwatch.errors import ModelError


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
        when neither tokenizer.json nor vocab.json + merges.txt exists or they cannot be parsed.
        """
        tokenizer_json = path / "tokenizer.json"
        vocab, merges = path / "vocab.json", path / "merges.txt"
        try:
            if tokenizer_json.is_file():
                tokenizer = Tokenizer.from_file(str(tokenizer_json))
            elif vocab.is_file() and merges.is_file():
                # GPT-2 / BART style byte-level BPE, as transformers' slow tokenizers read these two files.
                tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
                tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
                tokenizer.decoder = decoders.ByteLevel()
            else:
                raise ModelError(f"{path}: missing tokenizer.json (or vocab.json + merges.txt)")
        except ModelError:
            raise
        except Exception as exc:  # tokenizers raises bare Exception subclasses from Rust
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelError(f"{path}: cannot load the tokenizer: {first}") from None
        return cls(tokenizer, special_ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Return the caption text for ``ids`` (special tokens dropped, surrounding whitespace stripped)."""
        kept = [int(i) for i in ids if int(i) not in self._special]
        text: str = self._tokenizer.decode(kept, skip_special_tokens=True)
        return text.strip()

    def encode(self, text: str) -> list[int]:
        """Return the token ids of ``text`` without special tokens added (used for task prompts)."""
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False).ids
        return ids
