"""Small DOM (minidom) helpers shared by the XMP merges (caption: ``xmp``; keywords and OCR text:
``xmp_keywords``), the namespaces they name, and XmpError."""

from __future__ import annotations

from collections.abc import Callable
from xml.dom import Node
from xml.dom.minidom import Attr, Document, Element

from capwatch.errors import MetadataError

NS_RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
NS_DC = "http://purl.org/dc/elements/1.1/"
NS_XML = "http://www.w3.org/XML/1998/namespace"
NS_XMLNS = "http://www.w3.org/2000/xmlns/"
NS_CAPWATCH = "https://capwatch.invalid/ns/1.0/"
LANG = frozenset({(NS_XML, "lang")})


class XmpError(MetadataError):
    """An XMP packet is malformed or hostile (DTD, entities) and cannot be read or merged, or a property it
    would change (dc:description, dc:subject) has a form that the merge will not replace."""


def children(el: Element, ns: str, local: str) -> list[Element]:
    return [c for c in el.childNodes if isinstance(c, Element) and c.namespaceURI == ns and c.localName == local]


def prefix_for(el: Element, ns: str, wanted: str) -> str:
    """A prefix bound to ``ns`` in scope at ``el``; else declare ``wanted`` (or a free variant) on ``el``."""
    node: Node | None = el
    used: set[str] = set()
    while isinstance(node, Element):
        for attr in node.attributes.values():
            name = str(attr.name)
            if name.startswith("xmlns:"):
                if attr.value == ns:
                    return name[6:]
                used.add(name[6:])
        node = node.parentNode
    prefix, n = wanted, 1
    while prefix in used:
        n += 1
        prefix = f"{wanted}{n}"
    el.setAttributeNS(NS_XMLNS, f"xmlns:{prefix}", ns)
    return prefix


def set_text(doc: Document, el: Element, text: str) -> None:
    for child in list(el.childNodes):
        el.removeChild(child)
    el.appendChild(doc.createTextNode(text))


def children_ns(el: Element, ns: str) -> list[Element]:
    return [c for c in el.childNodes if isinstance(c, Element) and c.namespaceURI == ns]


def node_name(node: Element | Attr) -> str:
    """A node's name for a message, with the conventional prefix for RDF, XML and DC whatever the packet uses."""
    known = {NS_RDF: "rdf", NS_XML: "xml", NS_DC: "dc"}.get(str(node.namespaceURI))
    return f"{known}:{node.localName}" if known else str(node.nodeName)[:60]


def has_text(el: Element) -> bool:
    return any(
        c.nodeType in (Node.TEXT_NODE, Node.CDATA_SECTION_NODE) and str(c.data).strip() for c in el.childNodes
    )


def text_of(el: Element) -> str:
    return "".join(str(c.data) for c in el.childNodes if c.nodeType in (Node.TEXT_NODE, Node.CDATA_SECTION_NODE))


def check_attributes(el: Element, allowed: frozenset[tuple[str, str]], *, inner: bool,
                     error: Callable[[str], XmpError]) -> None:
    """Returns None when ``el`` has no attributes beyond namespace declarations and ``allowed``; raises
    ``error(what)`` otherwise."""
    # Namespace declarations are always fine; any other attribute (rdf:parseType, rdf:resource, a property
    # attribute making the value a structure, ...) changes what the element means.
    for attr in el.attributes.values():
        if attr.namespaceURI != NS_XMLNS and (str(attr.namespaceURI), str(attr.localName)) not in allowed:
            raise error(f"{node_name(el)} with {node_name(attr)}" if inner else node_name(attr))
