"""dc:description in several languages: the ``xml:lang`` items of its rdf:Alt beside ``x-default``.

capwatch writes one item per configured language (English included) and records the exact text of each item it
wrote in ``capwatch:Captions`` (an rdf:Alt with the same ``xml:lang`` items). Whose an item is follows from that
record, as for the caption itself (``capwatch:Caption``):

* an item whose text equals what capwatch recorded for its language, or that did not exist, is capwatch's: it is
  (re)written with the new text;
* any other item is a person's (written by them, or edited since capwatch wrote it): it stays byte for byte and is
  no longer recorded as capwatch's;
* an item capwatch recorded for a language no longer configured is removed when it still holds capwatch's text.

Language tags compare case-insensitively (RFC 4646 / XMP). x-default is not handled here (see ``xmp.merge_caption``).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from xml.dom.minidom import Document, Element
from xml.etree.ElementTree import Element as EtElement

from capwatch.metadata.xmp_dom import NS_CAPWATCH, NS_DC, NS_RDF, NS_XML, children, set_text, text_of

X_DEFAULT = "x-default"
Items = tuple[tuple[str, str], ...]


def _q(ns: str, local: str) -> str:
    return "{" + ns + "}" + local


def read_alt(desc: EtElement, ns: str, local: str) -> Items | None:
    """The (language, text) items of an rdf:Alt property other than x-default, NFC, in order; None when ``desc``
    lacks the property or it is no rdf:Alt."""
    el = desc.find(_q(ns, local))
    if el is None:
        return None
    alt = el.find(_q(NS_RDF, "Alt"))
    if alt is None:
        return None
    out = []
    for li in alt.findall(_q(NS_RDF, "li")):
        lang = li.get(_q(NS_XML, "lang"))
        if lang and lang.lower() != X_DEFAULT and len(li) == 0:
            out.append((lang, unicodedata.normalize("NFC", (li.text or "").strip())))
    return tuple(out)


def read_description_items(desc: EtElement) -> Items | None:
    """The language items of one rdf:Description's dc:description (see :func:`read_alt`)."""
    return read_alt(desc, NS_DC, "description")


def read_recorded(desc: EtElement) -> Items | None:
    """capwatch:Captions of one rdf:Description: the items capwatch wrote, by language."""
    return read_alt(desc, NS_CAPWATCH, "Captions")


def recorded_dom(descriptions: list[Element]) -> dict[str, str]:
    """capwatch:Captions from the first top-level rdf:Description that has it, language (as written) -> text."""
    for desc in descriptions:
        for prop in children(desc, NS_CAPWATCH, "Captions"):
            for alt in children(prop, NS_RDF, "Alt")[:1]:
                return {str(li.getAttributeNS(NS_XML, "lang")): unicodedata.normalize("NFC", text_of(li).strip())
                        for li in children(alt, NS_RDF, "li") if li.getAttributeNS(NS_XML, "lang")}
    return {}


def merge_items(doc: Document, alt: Element, rdf_prefix: str, wanted: Mapping[str, str],
                recorded: Mapping[str, str]) -> dict[str, str]:
    """Set the language items of the dc:description rdf:Alt ``alt`` to ``wanted`` (language -> text) by the rules of
    this module, given capwatch's ``recorded`` items (language -> text). Returns the items that are capwatch's
    afterwards (language as written -> text), to be recorded."""
    recorded = {lang.lower(): text for lang, text in recorded.items()}
    items = [li for li in children(alt, NS_RDF, "li") if li.getAttributeNS(NS_XML, "lang")]
    by_lang = {str(li.getAttributeNS(NS_XML, "lang")).lower(): li for li in items}
    owned: dict[str, str] = {}
    for language, text in wanted.items():
        key = language.lower()
        if key == X_DEFAULT:
            continue
        li = by_lang.get(key)
        if li is None:
            li = doc.createElementNS(NS_RDF, f"{rdf_prefix}:li")
            li.setAttributeNS(NS_XML, "xml:lang", language)
            set_text(doc, li, text)
            alt.appendChild(li)
            by_lang[key] = li
            owned[language] = text
            continue
        current = unicodedata.normalize("NFC", text_of(li).strip())
        if current == text or recorded.get(key) == current:
            if current != text:
                set_text(doc, li, text)
            owned[language] = text
        # else: a person's words in this language stay as they are, and are not recorded as ours
    wanted_keys = {lang.lower() for lang in wanted}
    for key, text in recorded.items():
        li = by_lang.get(key)
        if key not in wanted_keys and li is not None and unicodedata.normalize("NFC", text_of(li).strip()) == text:
            alt.removeChild(li)
    return owned


def alt_element(doc: Document, qname: str, rdf_prefix: str, items: Mapping[str, str]) -> Element:
    """``<qname><rdf:Alt><rdf:li xml:lang=...>text</rdf:li>...</rdf:Alt></qname>`` in capwatch's namespace."""
    prop = doc.createElementNS(NS_CAPWATCH, qname)
    alt = doc.createElementNS(NS_RDF, f"{rdf_prefix}:Alt")
    prop.appendChild(alt)
    for language, text in items.items():
        li = doc.createElementNS(NS_RDF, f"{rdf_prefix}:li")
        li.setAttributeNS(NS_XML, "xml:lang", language)
        li.appendChild(doc.createTextNode(text))
        alt.appendChild(li)
    return prop


def set_persons(doc: Document, alt: Element, rdf_prefix: str, items: Mapping[str, str],
                owned: Mapping[str, str]) -> dict[str, str]:
    """Write ``items`` (language -> text) into the rdf:Alt as a person's words (an edit from ``capwatch serve``);
    returns ``owned`` without those languages (they are no longer capwatch's)."""
    by_lang = {str(li.getAttributeNS(NS_XML, "lang")).lower(): li for li in children(alt, NS_RDF, "li")
               if li.getAttributeNS(NS_XML, "lang")}
    for language, text in items.items():
        li = by_lang.get(language.lower())
        if li is None:
            li = doc.createElementNS(NS_RDF, f"{rdf_prefix}:li")
            li.setAttributeNS(NS_XML, "xml:lang", language)
            alt.appendChild(li)
        set_text(doc, li, text)
    edited = {lang.lower() for lang in items}
    return {lang: text for lang, text in owned.items() if lang.lower() not in edited}
