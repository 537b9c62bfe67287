"""XMP dc:subject merging (capwatch's keywords next to a person's, rules in ``capwatch.metadata.keywords``) and
capwatch:Text (OCR), on the minidom document that ``capwatch.metadata.xmp.merge_caption`` edits."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from xml.dom.minidom import Document, Element

from capwatch.metadata import keywords as kw
from capwatch.metadata.xmp_dom import (
    LANG,
    NS_CAPWATCH,
    NS_DC,
    NS_RDF,
    XmpError,
    check_attributes,
    children,
    has_text,
    node_name,
    prefix_for,
    text_of,
)

#: capwatch:Text is cut to this many UTF-8 bytes, so that OCR text alone never pushes a JPEG's XMP over one
#: segment (a whiteboard photo can hold pages of text; the index keeps all of it).
TEXT_LIMIT = 16_000


def clean_text(text: str) -> str:
    """OCR text as capwatch writes it: NFC; line breaks kept as ``\\n`` (other control characters and characters
    XML 1.0 cannot carry become a space); trailing spaces on lines and blank lines at the ends removed; cut to
    ``TEXT_LIMIT`` bytes at a character boundary."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = "".join(
        ch if ch == "\n" or (unicodedata.category(ch) not in ("Cc", "Cs") and ch not in "\ufffe\uffff") else " "
        for ch in text
    )
    text = "\n".join(line.rstrip() for line in text.split("\n")).strip()
    data = text.encode("utf-8")
    if len(data) > TEXT_LIMIT:
        text = data[:TEXT_LIMIT].decode("utf-8", errors="ignore").rstrip()
    return text


def dom_text(desc: Element, ns: str, local: str) -> str | None:
    """A simple property of one rdf:Description as written (attribute or element text); None when absent or not
    simple."""
    if desc.hasAttributeNS(ns, local):
        return str(desc.getAttributeNS(ns, local))
    for el in children(desc, ns, local):
        return None if any(isinstance(c, Element) for c in el.childNodes) else text_of(el)
    return None


def recorded_list(descriptions: list[Element], local: str) -> tuple[str, ...]:
    """A capwatch bag (Keywords, RejectedKeywords) as recorded: the first top-level rdf:Description with it."""
    for desc in descriptions:
        for prop in children(desc, NS_CAPWATCH, local):
            for container in prop.childNodes:
                if isinstance(container, Element) and container.namespaceURI == NS_RDF:
                    items = (text_of(li).strip() for li in children(container, NS_RDF, "li"))
                    return tuple(unicodedata.normalize("NFC", t) for t in items if t)
    return ()


def bag(doc: Document, ns: str, qname: str, rdf_prefix: str, items: Sequence[str]) -> Element:
    """A new property element ``qname`` (in ``ns``) holding an rdf:Bag of ``items``."""
    prop = doc.createElementNS(ns, qname)
    container = doc.createElementNS(NS_RDF, f"{rdf_prefix}:Bag")
    for item in items:
        li = doc.createElementNS(NS_RDF, f"{rdf_prefix}:li")
        li.appendChild(doc.createTextNode(item))
        container.appendChild(li)
    prop.appendChild(container)
    return prop


def _subject_error(what: str) -> XmpError:
    return XmpError(f"dc:subject has an unexpected form ({what}); not changed")


def subject_items(prop: Element) -> tuple[Element | None, list[tuple[Element | None, str]]]:
    """(container, [(rdf:li or None for a simple value, text)]) of one dc:subject element.

    Understood: an rdf:Bag or rdf:Seq of ``rdf:li`` holding text (xml:lang allowed), or simple text (some writers
    put one keyword there). Raises XmpError for anything else (rdf:Alt, rdf:parseType, rdf:resource, items with
    element content, text beside the container, more than one container).
    """
    check_attributes(prop, LANG, inner=False, error=_subject_error)
    elements = [c for c in prop.childNodes if isinstance(c, Element)]
    if not elements:
        text = text_of(prop).strip()
        return None, [(None, text)] if text else []
    container = elements[0]
    if len(elements) > 1 or container.namespaceURI != NS_RDF or container.localName not in ("Bag", "Seq"):
        raise _subject_error(node_name(elements[-1]) if len(elements) > 1 else node_name(container))
    if has_text(prop) or has_text(container):
        raise _subject_error("text beside the rdf:Bag")
    check_attributes(container, frozenset(), inner=True, error=_subject_error)
    items: list[tuple[Element | None, str]] = []
    for li in container.childNodes:
        if not isinstance(li, Element):
            continue
        if li.namespaceURI != NS_RDF or li.localName != "li":
            raise _subject_error(f"{node_name(li)} inside the rdf:Bag")
        check_attributes(li, LANG, inner=True, error=_subject_error)
        if any(isinstance(c, Element) for c in li.childNodes):
            raise _subject_error("rdf:li with element content")
        items.append((li, text_of(li)))
    return container, items


def merge_subject(doc: Document, descriptions: list[Element], target: Element, rdf_prefix: str,
                   wanted: Sequence[str], other_human: Sequence[str], recorded_ours: Sequence[str],
                   recorded_rejected: Sequence[str], deleted: Sequence[str] = ()
                   ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Merge ``wanted`` into dc:subject in place (a person's items untouched, ours replaced); returns the new
    (capwatch:Keywords, capwatch:RejectedKeywords). Raises XmpError for a dc:subject it does not understand."""
    holders = [d for d in descriptions if d.hasAttributeNS(NS_DC, "subject") or children(d, NS_DC, "subject")]
    props = [p for d in holders for p in children(d, NS_DC, "subject")]
    attrs = [d for d in holders if d.hasAttributeNS(NS_DC, "subject")]
    if len(props) + len(attrs) > 1:
        raise XmpError("dc:subject is given more than once; not changed")
    container: Element | None = None
    items: list[tuple[Element | None, str]] = []
    holder = holders[0] if holders else target
    prop = props[0] if props else None
    if attrs:
        value = str(holder.getAttributeNS(NS_DC, "subject")).strip()
        items = [(None, value)] if value else []
    elif prop is not None:
        container, items = subject_items(prop)
    texts = [text for _, text in items]
    result = kw.merge(texts, recorded_ours, recorded_rejected, wanted, other_human=other_human, deleted=deleted)
    if container is None:
        # Absent, the attribute form or simple text: becomes the standard rdf:Bag (the person's value its item).
        if attrs:
            holder.removeAttributeNS(NS_DC, "subject")
        final = result.subjects(texts)
        new = bag(doc, NS_DC, f"{prefix_for(holder, NS_DC, 'dc')}:subject", rdf_prefix, final) if final else None
        if prop is not None and new is not None:
            holder.replaceChild(new, prop)
        elif prop is not None:
            holder.removeChild(prop)
        elif new is not None:
            holder.appendChild(new)
        return result.ours, result.rejected
    keep = set(result.human)
    for i, (li, _) in enumerate(items):
        if i not in keep and li is not None:
            container.removeChild(li)
    prefix = container.prefix or rdf_prefix
    for item in (*result.added_human, *result.ours):
        li = doc.createElementNS(NS_RDF, f"{prefix}:li")
        li.appendChild(doc.createTextNode(item))
        container.appendChild(li)
    if not children(container, NS_RDF, "li") and len(items) > 0 and prop is not None:
        holder.removeChild(prop)  # it held only our keywords, and ours are gone: no empty bag left behind
    return result.ours, result.rejected


NS_LR = "http://ns.adobe.com/lightroom/1.0/"
NS_DIGIKAM = "http://www.digikam.org/ns/1.0/"


@dataclass(frozen=True)
class KeywordHierarchy:
    """Where capwatch's keywords go in the hierarchical keyword lists: under ``parent`` ("capwatch", "Auto|Tags").

    Lightroom's lr:hierarchicalSubject (an rdf:Bag of "a|b|c") and digiKam's digiKam:TagsList (an rdf:Seq of
    "a/b/c") get ``parent|keyword`` / ``parent/keyword`` for each of capwatch's keywords. What capwatch wrote is
    recorded in capwatch:HierarchicalKeywords (Lightroom form), so a later write replaces exactly those entries;
    every other entry (a person's hierarchy) stays byte for byte.
    """

    parent: str

    def entries(self, keywords: Sequence[str]) -> tuple[str, ...]:
        """The Lightroom-form entries of ``keywords`` ("|" inside a keyword would make levels: it becomes "/")."""
        return tuple(dict.fromkeys(f"{self.parent}|{k.replace('|', '/')}" for k in keywords))


def _tags_list(entry: str) -> str:
    """digiKam's form of a Lightroom-form entry."""
    return "/".join(part.replace("/", "\u2215") for part in entry.split("|"))


def merge_hierarchy(doc: Document, descriptions: list[Element], target: Element, rdf_prefix: str,
                    wanted: Sequence[str], recorded: Sequence[str]) -> tuple[str, ...]:
    """Put the Lightroom-form entries ``wanted`` into lr:hierarchicalSubject and digiKam:TagsList in place, removing
    the entries capwatch ``recorded`` earlier that are no longer wanted; a person's entries are not touched. Returns
    what to record in capwatch:HierarchicalKeywords. Raises XmpError for a list of a form it does not understand."""
    for ns, local, prefix, container, convert in (
            (NS_LR, "hierarchicalSubject", "lr", "Bag", lambda e: e),
            (NS_DIGIKAM, "TagsList", "digiKam", "Seq", _tags_list)):
        want = [convert(e) for e in wanted]
        drop = {convert(e) for e in recorded} - set(want)
        holders = [d for d in descriptions if children(d, ns, local) or d.hasAttributeNS(ns, local)]
        if any(d.hasAttributeNS(ns, local) for d in holders) or sum(len(children(d, ns, local)) for d in holders) > 1:
            raise XmpError(f"{prefix}:{local} has an unexpected form; not changed")
        prop = children(holders[0], ns, local)[0] if holders else None
        if prop is None:
            if want:
                new = doc.createElementNS(ns, f"{prefix_for(target, ns, prefix)}:{local}")
                box = doc.createElementNS(NS_RDF, f"{rdf_prefix}:{container}")
                new.appendChild(box)
                target.appendChild(new)
                _append(doc, box, rdf_prefix, want)
            continue
        box_el, items = subject_items(prop)
        if box_el is None:
            raise XmpError(f"{prefix}:{local} has an unexpected form (not a list); not changed")
        present = set()
        for li, text in items:
            if li is not None and text in drop:
                box_el.removeChild(li)
            else:
                present.add(text)
        _append(doc, box_el, box_el.prefix or rdf_prefix, [e for e in want if e not in present])
        if not children(box_el, NS_RDF, "li"):
            holders[0].removeChild(prop)  # it held only capwatch's entries, now gone: no empty list left behind
    return tuple(wanted)


def _append(doc: Document, box: Element, rdf_prefix: str, items: Sequence[str]) -> None:
    for item in items:
        li = doc.createElementNS(NS_RDF, f"{rdf_prefix}:li")
        li.appendChild(doc.createTextNode(item))
        box.appendChild(li)
