"""Captions and keywords in the user's languages: the translation models of ``[language]``, loaded on demand.

English is what the captioning models write; every other language of ``[language] captions`` / ``default`` is a
Marian translation of it (:mod:`capwatch.models.marian`). Keywords are written in the default language: labels
repeat across a library ("dog", "person", "car"), so each is translated once and remembered.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

from capwatch.config import Config, LanguageConfig, ModelConfig
from capwatch.errors import ModelError
from capwatch.models.marian import Translator
from capwatch.models.registry import translation_model_name

#: Labels remembered per language (a library has a few hundred distinct ones).
LABEL_CACHE_SIZE = 10_000
_TRAILING = re.compile(r"[\s.!?。]+$")


def model_reference(config: LanguageConfig, language: str, base: Path | None = None) -> str | Path:
    """The translation model of ``language``: a directory (Path; relative ones are taken from ``base``, the config
    file's folder) or a registry name. Raises ModelError (one line) when capwatch knows no model for it."""
    named = config.models.get(language)
    if named is None:
        name = translation_model_name(language)
        if not name:
            raise ModelError(f"no translation model known for language {language!r}: set [language] models.{language} "
                             "to a Marian model directory or registry name")
        return name
    if os.sep in named or named.startswith(".") or named.startswith("~") or Path(named).is_dir():
        path = Path(named).expanduser()
        return path if path.is_absolute() or base is None else base / path
    return named


class Translations:
    """The translators of one configuration, opened lazily (a language's model is loaded on its first text)."""

    def __init__(self, config: Config, env: Mapping[str, str] = os.environ, *, download: bool = False,
                 threads: int | None = None) -> None:
        """Resolve every language's model now (so a missing one is reported before any file is touched); load none.

        ``download``: pull a named model that is not cached yet (unless ``$CAPWATCH_OFFLINE``). Raises ModelError
        (one line) when a model cannot be found or opened.
        """
        from capwatch.models.store import resolve_model

        self.config = config.language
        self.translators: dict[str, Translator] = {}
        base = config.source.parent if config.source is not None else None
        for language in self.config.translated:
            ref = model_reference(self.config, language, base)
            model = config.model
            use = model.threads if threads is None else threads
            if isinstance(ref, Path):
                self.translators[language] = Translator(ref, threads=use, providers=model.providers,
                                                        idle_unload_seconds=model.idle_unload_seconds)
            else:
                resolved = resolve_model(ModelConfig(name=ref), env, download=download, kind="translate")
                self.translators[language] = Translator(
                    resolved.dir, precision=resolved.precision, model_id=resolved.model_id,
                    revision=resolved.revision, threads=use, providers=model.providers,
                    idle_unload_seconds=model.idle_unload_seconds)
        self._labels: dict[str, OrderedDict[str, str]] = {lang: OrderedDict() for lang in self.translators}

    @property
    def languages(self) -> tuple[str, ...]:
        """Every language written, English first."""
        return self.config.languages

    @property
    def default(self) -> str:
        return self.config.default

    def captions(self, english: Sequence[str]) -> list[dict[str, str]]:
        """For each English caption, its text per language (English included), in :attr:`languages` order. One
        translation call per language for the whole list. Raises ModelError when a model cannot be loaded."""
        out: list[dict[str, str]] = [{"en": text} for text in english]
        for language, translator in self.translators.items():
            for row, translation in zip(out, translator.translate(list(english)), strict=True):
                row[language] = translation.text
        return [{lang: row[lang] for lang in self.languages if lang in row} for row in out]

    def keywords(self, labels: Sequence[str]) -> tuple[str, ...]:
        """``labels`` (English) in the default language, each translated once per process and remembered; English
        returns them as they are. Raises ModelError when the model cannot be loaded."""
        language = self.default
        if language == "en" or not labels:
            return tuple(labels)
        cache = self._labels[language]
        missing = list(dict.fromkeys(label for label in labels if label not in cache))
        if missing:
            for label, translation in zip(missing, self.translators[language].translate(missing), strict=True):
                cache[label] = _TRAILING.sub("", translation.text).strip() or label
                if len(cache) > LABEL_CACHE_SIZE:
                    cache.popitem(last=False)
        out = []
        for label in labels:
            if label in cache:
                cache.move_to_end(label)
            out.append(cache.get(label, label))
        return tuple(dict.fromkeys(out))

    def unload_if_idle(self, now: float | None = None) -> bool:
        """Release idle translation models; True when one was released."""
        return any([t.unload_if_idle(now) for t in self.translators.values()])

    def close(self) -> None:
        for translator in self.translators.values():
            translator.close()


def open_translations(config: Config, env: Mapping[str, str] = os.environ, *,
                      download: bool = False) -> Translations | None:
    """The translators ``config`` asks for, None when it writes English alone. Raises ModelError (one line)."""
    if not config.language.translated:
        return None
    return Translations(config, env, download=download)
