"""Text -> token ids for image–text embedding models, exactly as transformers' tokenizer gives them.

The tokenizer is the model folder's ``tokenizer.json`` run by the ``tokenizers`` library (what transformers' fast
tokenizers do), with the settings transformers applies on top of it:

* **CLIP** (``CLIPTokenizer``): the file's own post-processor adds BOS/EOS; truncation to the text window (77 in
  every published CLIP) keeps EOS last; a batch is padded to its longest text with the pad token
  (``padding=True``), and ``attention_mask`` marks the real tokens.
* **SigLIP** (``SiglipTokenizer``, SentencePiece in transformers): the text is canonicalised first as the slow
  tokenizer does — lower-cased (``do_lower_case``), ASCII punctuation removed, whitespace runs collapsed, stripped —
  and every text is padded to the full window (``padding="max_length"``, 64), as the model was trained.
* **SigLIP 2** (``GemmaTokenizer``): the post-processor is rebuilt from ``tokenizer_config.json``'s
  ``add_bos_token`` (default true) / ``add_eos_token`` (default false) as ``GemmaTokenizerFast`` does, and the
  padding side defaults to the left, as that class's does.

The window is the smaller of ``tokenizer_config.json``'s ``model_max_length`` and the text tower's
``max_position_embeddings`` (transformers' default when config.json leaves it out: 77 for CLIP, 64 for SigLIP).
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Tokenizer, processors

from capwatch.errors import ModelError
from capwatch.models.layout import MAX_TOKENIZER_BYTES, read_capped, read_json

#: Tokenizer classes whose fast version rebuilds the post-processor from add_bos_token / add_eos_token and pads on
#: the left by default (transformers' LlamaTokenizerFast / GemmaTokenizerFast).
_BOS_EOS_CLASSES = ("GemmaTokenizer", "GemmaTokenizerFast", "LlamaTokenizer", "LlamaTokenizerFast")
#: Tokenizer classes that canonicalise text before tokenizing (transformers' SiglipTokenizer).
_CANONICAL_CLASSES = ("SiglipTokenizer", "SiglipTokenizerFast")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_SPACES = re.compile(r"\s+")
#: Text positions of the families' text towers when config.json does not say (CLIPTextConfig / SiglipTextConfig).
_DEFAULT_POSITIONS = {"clip": 77, "siglip": 64}
#: A text window longer than this is not a text window (transformers' "no limit" is 1e30).
_MAX_WINDOW = 1 << 16


@dataclass(frozen=True)
class TokenizedBatch:
    """Token ids and attention mask of a batch, both int64 [n, length]."""

    input_ids: np.ndarray
    attention_mask: np.ndarray


class EmbeddingTokenizer:
    """The text side of an embedding model folder (see the module docstring)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        max_length: int,
        pad_id: int,
        pad_to_max: bool,
        pad_left: bool,
        canonicalize: bool,
        lowercase: bool,
    ) -> None:
        self._tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = pad_id
        self.pad_to_max = pad_to_max
        self.pad_left = pad_left
        self._canonicalize = canonicalize
        self._lowercase = lowercase
        # Settings stored in tokenizer.json itself are replaced by transformers' call settings.
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length)

    @classmethod
    def from_dir(cls, path: Path, family: str, config: Mapping[str, Any]) -> EmbeddingTokenizer:
        """Load ``tokenizer.json`` (+ ``tokenizer_config.json``, ``special_tokens_map.json``) of the model folder.

        ``family`` is ``clip`` or ``siglip``; ``config`` the folder's config.json. Raises ModelError (one line,
        naming the file) when the tokenizer is missing, too large or unreadable, or no pad token can be found.
        """
        tokenizer_json = path / "tokenizer.json"
        try:
            tokenizer = Tokenizer.from_buffer(read_capped(tokenizer_json, MAX_TOKENIZER_BYTES))
        except FileNotFoundError:
            raise ModelError(f"{path}: missing tokenizer.json") from None
        except ModelError:
            raise
        except Exception as exc:  # tokenizers raises bare Exception subclasses from Rust
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelError(f"{tokenizer_json}: cannot load the tokenizer: {first}") from None
        settings = read_json(path / "tokenizer_config.json", required=False)
        special = read_json(path / "special_tokens_map.json", required=False)
        text_config = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else {}
        assert isinstance(text_config, Mapping)
        kind = str(settings.get("tokenizer_class") or "")

        def token(name: str) -> str | None:
            for source in (settings, special):
                value = source.get(name)
                if isinstance(value, Mapping):
                    value = value.get("content")
                if isinstance(value, str) and value:
                    return value
            return None

        def token_id(name: str) -> int | None:
            text = token(name)
            return tokenizer.token_to_id(text) if text is not None else None

        _add_declared_special_tokens(tokenizer, settings, special)
        if kind in _BOS_EOS_CLASSES:
            _rebuild_post_processor(tokenizer, settings, token, tokenizer_json)
        pad_id = token_id("pad_token")
        if pad_id is None:
            configured = text_config.get("pad_token_id")
            pad_id = configured if isinstance(configured, int) and not isinstance(configured, bool) else None
        if pad_id is None:
            raise ModelError(f"{path}: no pad token (tokenizer_config.json pad_token or config.json "
                             "text_config.pad_token_id)")
        # config.json leaves out values equal to transformers' defaults: 77 positions for CLIP, 64 for SigLIP.
        positions = _positive(text_config.get("max_position_embeddings")) or _DEFAULT_POSITIONS.get(family, 77)
        declared = _positive(settings.get("model_max_length"))
        max_length = min(positions, declared) if declared is not None else positions
        side = settings.get("padding_side")
        pad_left = side == "left" if side in ("left", "right") else kind in _BOS_EOS_CLASSES
        canonical = kind in _CANONICAL_CLASSES
        lowercase = canonical and settings.get("do_lower_case", True) is not False
        return cls(tokenizer, max_length=max_length, pad_id=pad_id, pad_to_max=family == "siglip",
                   pad_left=pad_left, canonicalize=canonical, lowercase=lowercase)

    def prepare(self, text: str) -> str:
        """The text as the tokenizer sees it (SigLIP's canonical form; others unchanged)."""
        if not self._canonicalize:
            return text
        if self._lowercase:
            text = text.lower()
        return _SPACES.sub(" ", text.translate(_PUNCTUATION)).strip()

    def encode(self, texts: Sequence[str]) -> TokenizedBatch:
        """Token ids + attention mask for ``texts`` (truncated to :attr:`max_length`, padded as the family is)."""
        encodings = self._tokenizer.encode_batch([self.prepare(t) for t in texts], add_special_tokens=True)
        rows = [list(e.ids) for e in encodings]
        length = self.max_length if self.pad_to_max else max((len(r) for r in rows), default=0)
        ids = np.full((len(rows), length), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), length), dtype=np.int64)
        for i, row in enumerate(rows):
            start = length - len(row) if self.pad_left else 0
            ids[i, start : start + len(row)] = row
            mask[i, start : start + len(row)] = 1
        return TokenizedBatch(ids, mask)


_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _add_declared_special_tokens(tokenizer: Tokenizer, *sources: Mapping[str, Any]) -> None:
    """Make every special token the configs declare an added special token of ``tokenizer``, as transformers'
    PreTrainedTokenizerFast does at load: a pad token "!" (LAION's CLIP exports) is then matched as one token
    before the BPE splits text, so "!!" is two "!" tokens and not the merged "!!" piece."""
    declared: list[object] = []
    for source in sources:
        declared.extend(source.get(key) for key in _SPECIAL_KEYS)
        extra = source.get("additional_special_tokens")
        if isinstance(extra, list):
            declared.extend(extra)
    have = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    new: list[AddedToken] = []
    for item in declared:
        if isinstance(item, str) and item:
            content, options = item, {}
        elif isinstance(item, Mapping) and isinstance(item.get("content"), str) and item["content"]:
            content = item["content"]
            options = {k: bool(item[k]) for k in ("single_word", "lstrip", "rstrip", "normalized") if k in item}
        else:
            continue
        if content in have:
            continue
        have.add(content)
        new.append(AddedToken(content, special=True, **options))
    if new:
        tokenizer.add_tokens(new)


def _positive(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= _MAX_WINDOW:
        return value
    return None


def _rebuild_post_processor(tokenizer: Tokenizer, settings: Mapping[str, Any], token: Any, where: Path) -> None:
    """BOS/EOS from add_bos_token / add_eos_token, as transformers' LlamaTokenizerFast.update_post_processor."""
    add_bos = settings.get("add_bos_token", True) is not False
    add_eos = settings.get("add_eos_token", False) is True
    parts: list[tuple[str, int]] = []
    for wanted, name in ((add_bos, "bos_token"), (add_eos, "eos_token")):
        if not wanted:
            continue
        text = token(name)
        ident = tokenizer.token_to_id(text) if text is not None else None
        if text is None or ident is None:
            raise ModelError(f"{where.parent / 'tokenizer_config.json'}: add_{name.split('_')[0]}_token is set but "
                             f"{name} is not in the vocabulary")
        parts.append((text, ident))
    bos = f"{parts[0][0]}:0 " if add_bos else ""
    eos = f" {parts[-1][0]}:0" if add_eos else ""
    single = f"{bos}$A:0{eos}"
    pair = f"{single}{(' ' + parts[0][0] + ':1') if add_bos else ''} $B:1{eos.replace(':0', ':1')}"
    tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=parts)
