"""XMP packets: parse (defusedxml: no DTDs, no entity expansion, no external entities), read the description and
capwatch provenance, and merge a caption into an existing packet keeping every other property, namespace and
language.

capwatch provenance namespace (stable, documented; never change the URI, readers key on it):
``xmlns:capwatch="https://capwatch.invalid/ns/1.0/"`` with simple properties ``capwatch:Source`` ("capwatch"),
``capwatch:Model``, ``capwatch:ModelRevision`` (absent when unknown), ``capwatch:ModelPrecision`` (the precision
the model's graphs ran at, e.g. ``int8`` or ``int8+vision_encoder=int8-static``; absent in captions written before
it was recorded), ``capwatch:CreatedAt`` (ISO 8601 UTC) and
``capwatch:Caption`` (the exact text capwatch wrote: if a person later edits dc:description, the texts differ and
the description counts as theirs), ``capwatch:Keywords`` (rdf:Bag: exactly the dc:subject items capwatch added),
``capwatch:RejectedKeywords`` (rdf:Bag: keywords capwatch added that someone removed since; never added again)
and ``capwatch:Text`` (text found in the image by OCR, when ``[metadata] write_text`` is on; never put into
dc:description). How keywords merge: ``capwatch.metadata.keywords``.

Never write what could not be fully read: ``merge_caption`` refuses (XmpError) to replace a dc:description of any
other form than the attribute, simple text or the standard rdf:Alt, and ``parse_xmp`` reads the description from
the same top-level rdf:Description elements that ``merge_caption`` writes.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from xml.dom.minidom import Document, Element
from xml.etree.ElementTree import Element as EtElement
from xml.etree.ElementTree import ParseError

import defusedxml.ElementTree as SafeET
import defusedxml.minidom as SafeMinidom
from defusedxml import DefusedXmlException

from capwatch.metadata import xmp_keywords, xmp_languages
from capwatch.metadata.keywords import clean_keywords
from capwatch.metadata.records import Provenance
from capwatch.metadata.xmp_dom import (
    LANG,
    check_attributes,
    children,
    children_ns,
    has_text,
    node_name,
    prefix_for,
    set_text,
    text_of,
)
from capwatch.metadata.xmp_dom import NS_CAPWATCH as NS_CAPWATCH
from capwatch.metadata.xmp_dom import NS_DC as NS_DC
from capwatch.metadata.xmp_dom import NS_RDF as NS_RDF
from capwatch.metadata.xmp_dom import NS_XML as NS_XML
from capwatch.metadata.xmp_dom import XmpError as XmpError
from capwatch.metadata.xmp_keywords import KeywordHierarchy as KeywordHierarchy
from capwatch.metadata.xmp_keywords import clean_text as clean_text

NS_X = "adobe:ns:meta/"
NS_XMP = "http://ns.adobe.com/xap/1.0/"
NS_PHOTOSHOP = "http://ns.adobe.com/photoshop/1.0/"
NS_EXIF = "http://ns.adobe.com/exif/1.0/"
NS_XMP_NOTE = "http://ns.adobe.com/xmp/note/"
NS_LR = "http://ns.adobe.com/lightroom/1.0/"
CAPWATCH_PREFIX = "capwatch"
PACKET_ID = "W5M0MpCehiHzreSzNTczkc9d"
XMP_TOOLKIT = "capwatch"


@dataclass(frozen=True)
class XmpInfo:
    """What capwatch reads from one packet."""

    description: str | None
    provenance: Provenance | None
    our_caption: str | None
    date_created: str | None  # photoshop:DateCreated
    date_time_original: str | None  # exif:DateTimeOriginal
    create_date: str | None  # xmp:CreateDate
    has_extended: bool
    subjects: tuple[str, ...] = ()  # dc:subject items, in order
    hierarchical: tuple[str, ...] = ()  # lr:hierarchicalSubject entries ("a|b|c"), in order
    our_keywords: tuple[str, ...] = ()  # capwatch:Keywords
    rejected_keywords: tuple[str, ...] = ()  # capwatch:RejectedKeywords
    text: str | None = None  # capwatch:Text (OCR)
    languages: tuple[tuple[str, str], ...] = ()  # dc:description items other than x-default: (xml:lang, text)
    our_languages: tuple[tuple[str, str], ...] = ()  # capwatch:Captions: the items capwatch wrote


def _q(ns: str, local: str) -> str:
    return "{" + ns + "}" + local


def _strip_packet(packet: bytes) -> bytes:
    # Some writers leave NULs or junk after the closing processing instruction; expat rejects them.
    end = packet.rfind(b">")
    data = packet[: end + 1] if end >= 0 else packet
    return data.lstrip(b"\x00")


def _parse_et(packet: bytes) -> EtElement:
    try:
        root = SafeET.fromstring(_strip_packet(packet), forbid_dtd=True)
    except DefusedXmlException:
        raise XmpError("unsafe XMP refused (DTD or entity declarations)") from None
    except (ParseError, ValueError) as exc:
        raise XmpError(f"malformed XMP ({str(exc).splitlines()[0][:80]})") from None
    return root


def _prop(desc: EtElement, ns: str, local: str) -> str | None:
    attr = desc.get(_q(ns, local))
    if attr is not None:
        return attr
    el = desc.find(_q(ns, local))
    if el is None:
        return None
    return (el.text or "").strip() if len(el) == 0 else None


def _top_level(root: EtElement) -> list[EtElement]:
    """The rdf:Description elements directly under the first rdf:RDF: the image's own properties. An
    rdf:Description deeper down is a structure value (say one event of an xmpMM:History Seq) and says nothing
    about the image; merge_caption writes only the top level, so reading must look only there too."""
    rdf = next(root.iter(_q(NS_RDF, "RDF")), None)
    return [] if rdf is None else rdf.findall(_q(NS_RDF, "Description"))


def parse_xmp(packet: bytes) -> XmpInfo:
    """Read the description (see ``_read_description``) and capwatch provenance from the top-level
    rdf:Description elements (the first one that has each wins), and the dates and HasExtendedXMP from any
    rdf:Description.

    Returns the XmpInfo (fields None when absent). Raises XmpError for malformed or hostile packets.
    """
    root = _parse_et(packet)
    top = _top_level(root)
    description = next((text for text in map(_read_description, top) if text is not None), None)
    props: dict[str, str] = {}
    for desc in top:
        for local in ("Source", "Model", "ModelRevision", "ModelPrecision", "CreatedAt", "Caption"):
            value = _prop(desc, NS_CAPWATCH, local)
            if value is not None and local not in props:
                props[local] = value
    dates: dict[str, str] = {}
    has_extended = False
    for desc in root.iter(_q(NS_RDF, "Description")):
        for key, ns, local in (
            ("ps", NS_PHOTOSHOP, "DateCreated"),
            ("exif", NS_EXIF, "DateTimeOriginal"),
            ("xmp", NS_XMP, "CreateDate"),
        ):
            value = _prop(desc, ns, local)
            if value and key not in dates:
                dates[key] = value
        if _prop(desc, NS_XMP_NOTE, "HasExtendedXMP"):
            has_extended = True
    lists: dict[tuple[str, str], tuple[str, ...]] = {}
    for desc in top:
        for ns, local in ((NS_DC, "subject"), (NS_LR, "hierarchicalSubject"), (NS_CAPWATCH, "Keywords"),
                          (NS_CAPWATCH, "RejectedKeywords")):
            items = _items(desc, ns, local)
            if items is not None and (ns, local) not in lists:
                lists[ns, local] = items
    text = next((t for t in (_prop_raw(desc, NS_CAPWATCH, "Text") for desc in top) if t is not None), None)
    languages = next((i for i in map(xmp_languages.read_description_items, top) if i is not None), ())
    our_languages = next((i for i in map(xmp_languages.read_recorded, top) if i is not None), ())
    provenance = None
    if props.get("Model") and props.get("CreatedAt"):
        provenance = Provenance(props["Model"], props.get("ModelRevision") or None, props["CreatedAt"],
                                props.get("ModelPrecision") or None)
    return XmpInfo(
        description=description,
        provenance=provenance,
        our_caption=props.get("Caption"),
        date_created=dates.get("ps"),
        date_time_original=dates.get("exif"),
        create_date=dates.get("xmp"),
        has_extended=has_extended,
        subjects=lists.get((NS_DC, "subject"), ()),
        hierarchical=lists.get((NS_LR, "hierarchicalSubject"), ()),
        our_keywords=lists.get((NS_CAPWATCH, "Keywords"), ()),
        rejected_keywords=lists.get((NS_CAPWATCH, "RejectedKeywords"), ()),
        text=text,
        languages=languages,
        our_languages=our_languages,
    )


def _prop_raw(desc: EtElement, ns: str, local: str) -> str | None:
    """Like ``_prop`` but the element text as written (OCR text keeps its line breaks), NFC."""
    attr = desc.get(_q(ns, local))
    if attr is None:
        el = desc.find(_q(ns, local))
        if el is None or len(el):
            return None
        attr = el.text or ""
    return unicodedata.normalize("NFC", attr)


def _items(desc: EtElement, ns: str, local: str) -> tuple[str, ...] | None:
    """The items of an array property (rdf:Bag/Seq/Alt ``rdf:li`` texts, stripped, blanks skipped), a simple
    value or attribute as one item (some writers do that), None when ``desc`` lacks the property."""
    attr = desc.get(_q(ns, local))
    if attr is not None:
        return (attr.strip(),) if attr.strip() else ()
    el = desc.find(_q(ns, local))
    if el is None:
        return None
    container = next((child for child in el if child.tag in _CONTAINERS), None)
    if container is None:
        value = (el.text or "").strip() if len(el) == 0 else ""
        return (value,) if value else ()
    texts = ((li.text or "").strip() for li in container.findall(_q(NS_RDF, "li")) if len(li) == 0)
    return tuple(unicodedata.normalize("NFC", t) for t in texts if t)


_CONTAINERS = frozenset({_q(NS_RDF, "Alt"), _q(NS_RDF, "Bag"), _q(NS_RDF, "Seq")})


def _read_description(desc: EtElement) -> str | None:
    """The dc:description of one rdf:Description, or None when it has none.

    Returns the attribute form as is; for an rdf:Alt the x-default item, else the first item; for an rdf:Bag or
    rdf:Seq the first item with non-blank text; for simple text the stripped text (None when blank). A Bag or
    Seq is not what the XMP spec says for dc:description, but some tools write it and exiftool reads it as the
    description: treating it as absent would let capwatch overwrite a person's words.
    """
    attr = desc.get(_q(NS_DC, "description"))
    if attr is not None:
        return attr
    el = desc.find(_q(NS_DC, "description"))
    if el is None:
        return None
    container = next((child for child in el if child.tag in _CONTAINERS), None)
    if container is None:
        return el.text.strip() if el.text and el.text.strip() else None
    items = container.findall(_q(NS_RDF, "li"))
    if container.tag == _q(NS_RDF, "Alt"):
        for li in items:
            if li.get(_q(NS_XML, "lang")) == "x-default":
                return li.text or ""
        return (items[0].text or "") if items else None
    return next((li.text for li in items if li.text and li.text.strip()), None)


def xmp_date_to_iso(value: str | None) -> str | None:
    """An XMP date ('YYYY', 'YYYY-MM-DD', 'YYYY-MM-DDTHH:MM[:SS][.s][tz]') as local 'YYYY-MM-DDTHH:MM:SS'."""
    if not value:
        return None
    text = value.strip()
    date, _, time = text.partition("T")
    parts = date.split("-")
    if len(parts) != 3 or not all(p.isdigit() for p in parts) or int(parts[0]) == 0:
        return None
    hh = mm = ss = 0
    if time:
        clock = time[:8]
        for sep in ("+", "-", "Z"):
            clock = clock.split(sep)[0]
        fields = clock.split(":")
        try:
            hh, mm = int(fields[0]), int(fields[1])
            ss = int(fields[2][:2]) if len(fields) > 2 and fields[2][:2].isdigit() else 0
        except (ValueError, IndexError):
            return None
    y, mo, d = (int(p) for p in parts)
    if not (1 <= mo <= 12 and 1 <= d <= 31 and hh <= 24 and mm < 60 and ss <= 60):
        return None
    return f"{y:04d}-{mo:02d}-{d:02d}T{hh:02d}:{mm:02d}:{ss:02d}"


# ------------------------------------------------------------------------------------------------------------
# Merging


def _skeleton() -> Document:
    xml = (
        f'<x:xmpmeta xmlns:x="{NS_X}" x:xmptk="{XMP_TOOLKIT}">'
        f'<rdf:RDF xmlns:rdf="{NS_RDF}"><rdf:Description rdf:about=""/></rdf:RDF></x:xmpmeta>'
    )
    doc: Document = SafeMinidom.parseString(xml)
    return doc


def _parse_dom(packet: bytes) -> Document:
    try:
        doc: Document = SafeMinidom.parseString(_strip_packet(packet), forbid_dtd=True)  # type: ignore[arg-type]
    except DefusedXmlException:
        raise XmpError("unsafe XMP refused (DTD or entity declarations)") from None
    except ValueError as exc:
        raise XmpError(f"malformed XMP ({str(exc).splitlines()[0][:80]})") from None
    except Exception as exc:  # expat.ExpatError has no stable public import path across versions
        raise XmpError(f"malformed XMP ({str(exc).splitlines()[0][:80]})") from None
    return doc


def _find_rdf(doc: Document) -> Element:
    for el in doc.getElementsByTagNameNS(NS_RDF, "RDF"):
        return el
    raise XmpError("XMP packet has no rdf:RDF element")


def merge_caption(packet: bytes | None, caption: str, provenance: Provenance | None, *,
                  keywords: Sequence[str] | None = None, other_human: Sequence[str] = (),
                  deleted: Sequence[str] = (), text: str | None = None, languages: Mapping[str, str] | None = None,
                  hierarchy: KeywordHierarchy | None = None, person_languages: Mapping[str, str] | None = None
                  ) -> str:
    """Return the XML (no xpacket wrapper) of ``packet`` with dc:description x-default = ``caption`` and capwatch
    provenance set; every other property, namespace and language is kept. ``packet=None`` starts a new one.
    ``provenance=None`` writes a person's words: the caption's capwatch provenance is removed, so readers see a
    human's (the record of which keywords are capwatch's, and its OCR text, stay).

    ``keywords`` (capwatch's, cleaned here) are merged into dc:subject by the rules of
    ``capwatch.metadata.keywords``, together with ``other_human`` (a person's keywords from another place of the
    same file, e.g. IPTC) and ``deleted`` (keywords a person deleted in that other place: removed and recorded as
    rejected); None leaves dc:subject and the recorded capwatch:Keywords as they are, ``[]`` removes
    capwatch's. ``text`` sets capwatch:Text ("" removes it); None keeps what the packet has. ``languages`` (language
    -> text) sets the xml:lang items of dc:description by the rules of ``capwatch.metadata.xmp_languages`` (a
    person's items stay); None leaves them and the record of capwatch's (capwatch:Captions) as they are.
    ``hierarchy`` also writes capwatch's keywords into lr:hierarchicalSubject and digiKam:TagsList under its parent
    (``capwatch.metadata.xmp_keywords.merge_hierarchy``); None leaves those lists alone. ``person_languages``
    (language -> text) writes those language items as a person's words (no longer recorded as capwatch's).

    When the packet already carries exactly this caption as capwatch's, from the same model and revision, its
    capwatch:CreatedAt is kept, so merging our own output again returns the same XML and the caller writes
    nothing. Raises XmpError when the packet is malformed or hostile, or when its dc:description (or, with
    ``keywords``, its dc:subject) has a form this function does not fully understand (see
    ``_check_description`` and ``_subject_items``): nothing is replaced then.
    """
    doc = _parse_dom(packet) if packet and packet.strip(b"\x00 \t\r\n") else _skeleton()
    rdf = _find_rdf(doc)
    rdf_prefix = rdf.prefix or "rdf"
    descriptions = children(rdf, NS_RDF, "Description")
    _check_description(descriptions)
    recorded_ours = xmp_keywords.recorded_list(descriptions, "Keywords")
    recorded_rejected = xmp_keywords.recorded_list(descriptions, "RejectedKeywords")
    texts = (xmp_keywords.dom_text(d, NS_CAPWATCH, "Text") for d in descriptions)
    recorded_text = next((t for t in texts if t is not None), None)
    recorded_languages = xmp_languages.recorded_dom(descriptions)
    recorded_hierarchy = xmp_keywords.recorded_list(descriptions, "HierarchicalKeywords")
    if not descriptions:
        new = doc.createElementNS(NS_RDF, f"{rdf_prefix}:Description")
        new.setAttributeNS(NS_RDF, f"{rdf_prefix}:about", "")
        rdf.appendChild(new)
        descriptions = [new]
    target = next(
        (d for d in descriptions if children(d, NS_DC, "description") or d.hasAttributeNS(NS_DC, "description")),
        descriptions[0],
    )
    created_at = _created_at(descriptions, target, caption, provenance) if provenance is not None else ""
    # Drop earlier capwatch provenance wherever it is, so there is exactly one set.
    for desc in descriptions:
        for child in children_ns(desc, NS_CAPWATCH):
            desc.removeChild(child)
        for attr in list(desc.attributes.values()):
            if attr.namespaceURI == NS_CAPWATCH:
                desc.removeAttributeNode(attr)
    alt = _set_description(doc, target, rdf_prefix, caption)
    owned_languages = recorded_languages
    if languages is not None:
        owned_languages = xmp_languages.merge_items(doc, alt, rdf_prefix, languages, recorded_languages)
    if person_languages:
        owned_languages = xmp_languages.set_persons(doc, alt, rdf_prefix, person_languages, owned_languages)
    ours, rejected = recorded_ours, recorded_rejected
    if keywords is not None:
        # Before the provenance is appended: a new dc:subject then sits where it will be found next time, so
        # merging our own output again yields the same XML.
        ours, rejected = xmp_keywords.merge_subject(doc, descriptions, target, rdf_prefix, clean_keywords(keywords),
                                                    other_human, recorded_ours, recorded_rejected, deleted)
    hierarchy_items = recorded_hierarchy
    if keywords is not None and hierarchy is not None:
        hierarchy_items = xmp_keywords.merge_hierarchy(doc, descriptions, target, rdf_prefix, hierarchy.entries(ours),
                                                       recorded_hierarchy)
    values: list[tuple[str, str]] = []
    if provenance is not None:
        values = [("Source", "capwatch"), ("Model", provenance.model)]
        if provenance.revision:
            values.append(("ModelRevision", provenance.revision))
        if provenance.precision:
            values.append(("ModelPrecision", provenance.precision))
        values += [("CreatedAt", created_at), ("Caption", caption)]
    text = recorded_text if text is None else clean_text(text)
    # A person's caption (provenance None) drops the caption's provenance only: which keywords are capwatch's and
    # the text it read stay recorded, since they are not the caption's.
    anything = values or ours or rejected or text or owned_languages or hierarchy_items
    cw = prefix_for(target, NS_CAPWATCH, CAPWATCH_PREFIX) if anything else ""
    for local, value in values:
        el = doc.createElementNS(NS_CAPWATCH, f"{cw}:{local}")
        el.appendChild(doc.createTextNode(value))
        target.appendChild(el)
    if owned_languages:
        target.appendChild(xmp_languages.alt_element(doc, f"{cw}:Captions", rdf_prefix, owned_languages))
    for local, items in (("Keywords", ours), ("RejectedKeywords", rejected), ("HierarchicalKeywords", hierarchy_items)):
        if items:
            target.appendChild(xmp_keywords.bag(doc, NS_CAPWATCH, f"{cw}:{local}", rdf_prefix, items))
    if text:
        el = doc.createElementNS(NS_CAPWATCH, f"{cw}:Text")
        el.appendChild(doc.createTextNode(text))
        target.appendChild(el)
    root = doc.documentElement
    assert root is not None
    xml = str(root.toxml())
    # One more parse/serialise pass puts attributes in the order the parser reports them (namespace
    # declarations first), so merging our own output again yields the same bytes (idempotent writes).
    again = _parse_dom(xml.encode("utf-8")).documentElement
    assert again is not None
    return str(again.toxml())


def _unexpected(what: str) -> XmpError:
    return XmpError(f"dc:description has an unexpected form ({what}); not changed")


def _check_description(descriptions: list[Element]) -> None:
    """Refuse a dc:description that merge_caption could not fully read, because replacing it would lose words.

    Understood: none at all; the attribute form ``dc:description="text"``; simple text
    ``<dc:description>text</dc:description>`` (an xml:lang on it allowed); the standard rdf:Alt whose items are
    ``rdf:li`` (xml:lang allowed) holding only text. ``descriptions`` are the top-level rdf:Description elements.
    Returns None; raises XmpError (one line) for anything else: rdf:Bag/rdf:Seq, rdf:parseType or rdf:resource,
    more than one container, other element children, items with element content, or the property given more
    than once (in one rdf:Description or in several).
    """
    count = 0
    for desc in descriptions:
        count += desc.hasAttributeNS(NS_DC, "description")
        props = children(desc, NS_DC, "description")
        count += len(props)
        for prop in props:
            _check_property(prop)
    if count > 1:
        raise XmpError("dc:description is given more than once; not changed")


def _check_property(prop: Element) -> None:
    """Returns None when one dc:description element is simple text or the standard rdf:Alt; raises XmpError."""
    check_attributes(prop, LANG, inner=False, error=_unexpected)
    elements = [c for c in prop.childNodes if isinstance(c, Element)]
    if not elements:
        return  # simple text
    containers = [e for e in elements if e.namespaceURI == NS_RDF and e.localName in ("Alt", "Bag", "Seq")]
    if len(containers) > 1:
        raise _unexpected("more than one container")
    alt = elements[0]
    if len(elements) > 1 or alt.namespaceURI != NS_RDF or alt.localName != "Alt":
        odd = next(e for e in elements if e.namespaceURI != NS_RDF or e.localName != "Alt")
        raise _unexpected(node_name(odd))
    if has_text(prop):
        raise _unexpected("text beside rdf:Alt")
    check_attributes(alt, frozenset(), inner=True, error=_unexpected)
    if has_text(alt):
        raise _unexpected("text inside rdf:Alt")
    for item in alt.childNodes:
        if not isinstance(item, Element):
            continue
        if item.namespaceURI != NS_RDF or item.localName != "li":
            raise _unexpected(f"{node_name(item)} inside rdf:Alt")
        check_attributes(item, LANG, inner=True, error=_unexpected)
        if any(isinstance(c, Element) for c in item.childNodes):
            raise _unexpected("rdf:li with element content")


def _simple_prop(desc: Element, ns: str, local: str) -> str | None:
    # The same reading as parse_xmp's _prop: the attribute form first, then a simple-text element, stripped.
    if desc.hasAttributeNS(ns, local):
        return str(desc.getAttributeNS(ns, local))
    for el in children(desc, ns, local):
        return None if any(isinstance(c, Element) for c in el.childNodes) else text_of(el).strip()
    return None


def _created_at(descriptions: list[Element], target: Element, caption: str, provenance: Provenance) -> str:
    """The CreatedAt to write: the recorded one when the packet already carries exactly ``caption`` as capwatch's
    (dc:description x-default and capwatch:Caption) from the same model, revision and precision, else
    ``provenance.created_at``. Only a timestamp that moved would otherwise make the packet differ, and
    rewriting a sidecar for that churns backups and sync."""
    recorded: dict[str, str] = {}
    for desc in descriptions:
        for local in ("Model", "ModelRevision", "ModelPrecision", "CreatedAt", "Caption"):
            value = _simple_prop(desc, NS_CAPWATCH, local)
            if value is not None and local not in recorded:
                recorded[local] = value
    x_default = None
    for prop in children(target, NS_DC, "description")[:1]:
        for alt in children(prop, NS_RDF, "Alt")[:1]:
            items = children(alt, NS_RDF, "li")
            x_default = next((text_of(li) for li in items if li.getAttributeNS(NS_XML, "lang") == "x-default"), None)
    same = (
        x_default == caption
        and recorded.get("Caption") == caption
        and recorded.get("Model") == provenance.model
        and (recorded.get("ModelRevision") or None) == (provenance.revision or None)
        and (recorded.get("ModelPrecision") or None) == (provenance.precision or None)
    )
    kept = recorded.get("CreatedAt")
    return kept if same and kept else provenance.created_at


def _set_description(doc: Document, target: Element, rdf_prefix: str, caption: str) -> Element:
    """Make ``target``'s dc:description the standard rdf:Alt with x-default = ``caption`` (other languages kept);
    returns the rdf:Alt.

    Expects a form ``_check_description`` accepted: absent, the attribute form, simple text or the rdf:Alt.
    """
    if target.hasAttributeNS(NS_DC, "description"):
        target.removeAttributeNS(NS_DC, "description")
    existing = children(target, NS_DC, "description")
    if existing:
        prop = existing[0]
    else:
        dc = prefix_for(target, NS_DC, "dc")
        prop = doc.createElementNS(NS_DC, f"{dc}:description")
        target.appendChild(prop)
    alts = children(prop, NS_RDF, "Alt")
    if not alts:
        # Simple text becomes a language alternative; an xml:lang on the property named the language of the text
        # being replaced, and would otherwise be inherited by the new x-default item.
        if prop.hasAttributeNS(NS_XML, "lang"):
            prop.removeAttributeNS(NS_XML, "lang")
        for child in list(prop.childNodes):
            prop.removeChild(child)
        alt = doc.createElementNS(NS_RDF, f"{rdf_prefix}:Alt")
        prop.appendChild(alt)
    else:
        alt = alts[0]
    items = children(alt, NS_RDF, "li")
    default = next((li for li in items if li.getAttributeNS(NS_XML, "lang") == "x-default"), None)
    if default is None:
        default = doc.createElementNS(NS_RDF, f"{rdf_prefix}:li")
        default.setAttributeNS(NS_XML, "xml:lang", "x-default")
        alt.insertBefore(default, alt.firstChild)
    set_text(doc, default, caption)
    return alt


def wrap_packet(xml: str, padding: int = 0) -> bytes:
    """``xml`` inside an xpacket wrapper with ``padding`` bytes of whitespace (room for in-place edits), UTF-8."""
    pad = b""
    if padding > 0:
        line = b" " * 99 + b"\n"
        pad = b"\n" + line * (padding // 100)
    return (
        b'<?xpacket begin="\xef\xbb\xbf" id="' + PACKET_ID.encode() + b'"?>\n'
        + xml.encode("utf-8")
        + pad
        + b'\n<?xpacket end="w"?>'
    )


def normalise(text: str) -> str:
    """Caption text as capwatch stores and compares it: NFC, surrounding whitespace removed."""
    return unicodedata.normalize("NFC", text).strip()
