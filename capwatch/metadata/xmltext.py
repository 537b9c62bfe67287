"""Which characters XML 1.0 (and so every XMP packet) can hold, and what capwatch does with the others.

XML 1.0 ``Char`` is tab, line feed, carriage return, U+0020..U+D7FF, U+E000..U+FFFD and U+10000..U+10FFFF: the
other C0 control characters (NUL, ESC, ...), lone surrogates (U+D800..U+DFFF) and the two non-characters U+FFFE
and U+FFFF cannot appear in an XML document at all, not even escaped. Pure functions, no XML.
"""

from __future__ import annotations


def xml_char(ch: str) -> bool:
    """True when XML 1.0 can hold the character ``ch``."""
    code = ord(ch)
    if code < 0x20:
        return ch in "\t\n\r"
    return not (0xD800 <= code <= 0xDFFF or code in (0xFFFE, 0xFFFF))


def unsafe_chars(text: str) -> tuple[str, ...]:
    """The distinct characters of ``text`` that XML 1.0 cannot hold, in order of first appearance."""
    return tuple(dict.fromkeys(ch for ch in text if not xml_char(ch)))


def xml_safe(text: str) -> str:
    """``text`` with every character XML 1.0 cannot hold replaced by a space (nothing else changes)."""
    if all(map(xml_char, text)):
        return text
    return "".join(ch if xml_char(ch) else " " for ch in text)


def describe_chars(chars: tuple[str, ...]) -> str:
    """The characters as people can read them: ``U+FFFF, U+001B``."""
    return ", ".join(f"U+{ord(ch):04X}" for ch in chars)
