"""How text is cut into searchable tokens beyond what SQLite's unicode61 tokenizer does.

unicode61 makes a whole run of Chinese, Japanese or Korean characters one token (there are no spaces to split on),
so `桜` could not find "日本の桜". The index therefore also keeps, per row, those characters one token each
(``cjk_tokens``), and a query term in those scripts becomes a phrase of single characters (``cjk_phrase``): the
characters must follow one another, as a substring does. This is the unigram approach of Lucene's CJK analyzers,
without a dictionary.
"""

from __future__ import annotations

import re

#: Han (with extensions and compatibility ideographs), Hiragana, Katakana (with phonetic extensions and half-width
#: forms), Hangul syllables and jamo, CJK symbols such as the iteration mark 々.
_CJK = re.compile(
    "[\u3005\u3006\u3007\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f"
    "\u1100-\u11ff\u3130-\u318f\uac00-\ud7af\U00020000-\U0003134f]+"
)


def has_cjk(text: str) -> bool:
    """True when ``text`` holds a Chinese, Japanese or Korean character."""
    return _CJK.search(text) is not None


def cjk_runs(text: str) -> list[str]:
    """The runs of CJK characters in ``text``, in order."""
    return _CJK.findall(text)


def cjk_tokens(*texts: str | None) -> str:
    """The CJK characters of ``texts`` as space-separated single-character tokens, one run per line ("" when there
    are none): what the index's ``cjk`` column holds."""
    runs = [run for text in texts if text for run in _CJK.findall(text)]
    return "\n".join(" ".join(run) for run in runs)


def cjk_phrase(run: str) -> str:
    """A run of CJK characters as the FTS5 phrase of its characters (quoted, so it cannot fail to parse)."""
    return '"' + " ".join(run).replace('"', '""') + '"'
