"""Keywords: cleaning capwatch's own, and merging them with a person's (pure functions, no XML, no files).

The rules (the XMP, IPTC and sidecar writers all apply them, so every place agrees):

- **A person's keywords stay**, in their order, byte for byte. Which keywords are capwatch's is recorded in the
  provenance namespace (``capwatch:Keywords``, an rdf:Bag of exactly the texts capwatch added to dc:subject);
  every other keyword is a person's. A re-caption removes only the items that are capwatch's and appends the new
  ones. IPTC has no provenance of its own: an IPTC keyword is capwatch's when it equals one in that list, or its
  64-byte cut.
- **Ours are appended**, de-duplicated case-insensitively (``str.casefold``) against the person's and each other:
  when a person already has "Dog", capwatch does not add "dog" and does not count it as its own.
- **A keyword that was ours and that a person also added**: when the file holds it twice, one copy is ours and
  the other the person's, and the person's survives a re-caption. When it holds it once (the usual case: tools
  do not add a keyword already present), the two cannot be told apart and it counts as ours; the person can make
  it theirs by removing and re-adding it (see next rule).
- **A person's removal of one of our keywords is remembered**: a keyword that ``capwatch:Keywords`` lists but
  dc:subject no longer holds was removed by someone, and is added to ``capwatch:RejectedKeywords``; capwatch never
  adds a rejected keyword again (case-insensitively), whatever a later model says. A person adding it back makes
  it theirs.
- **A deletion in IPTC alone is a deletion too** (``iptc_deletions``): when IPTC carries a Photoshop IPTC digest
  (capwatch writes one whenever it writes IPTC), one of capwatch's keywords that IPTC 2:25 no longer holds was
  deleted there (``exiftool -IPTC:Keywords-=x``); when that digest no longer matches (a tool that does not keep
  XMP in step, such as exiftool, edited IPTC since), IPTC's list is the newer one and every dc:subject keyword it
  lacks, a person's too, was deleted there. Such keywords leave dc:subject and join
  ``capwatch:RejectedKeywords``, so they are never added again. Without a digest nothing tells which list is
  newer, and nothing counts as deleted.
- **IPTC and XMP agree afterwards**: a person's keywords found only in IPTC 2:25 are appended to dc:subject (after
  the person's XMP ones, before ours), and a person's XMP keywords missing from IPTC are appended to IPTC, so that
  the Photoshop IPTC digest capwatch updates is truthful and MWG readers see one list. A person's keyword deleted
  in XMP only, with a tool that left the IPTC copy and its digest alone, therefore comes back from that copy (a
  matching digest does not prove that the two lists agreed when it was written: a caption written without
  keywords updates it too). A person's IPTC keyword holding characters XML cannot hold (ESC, NUL) gets spaces in
  their place in its dc:subject copy; the IPTC bytes stay as they are, and the two count as the same keyword.
- **Without the record, nothing is ours**: a tool that rewrites the XMP and drops capwatch's namespace turns our
  earlier keywords into a person's (they then stay). Keywords that capwatch 1 wrote before this existed: likewise.
- **Cleaning** (ours only; a person's are never changed): NFC; newlines, tabs and other control characters are
  replaced by a space (a keyword is one line in every tool; refusing it would fail the whole write for one odd
  label); whitespace runs collapse to one space; characters XML 1.0 cannot carry (surrogates, U+FFFE/U+FFFF) are
  dropped; empty results are dropped. Commas, semicolons, ``<&>`` and any script are kept as they are: XMP
  escapes them and IPTC stores one keyword per dataset, so they round-trip exactly.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from capwatch.metadata.xmltext import xml_char, xml_safe

#: IPTC IIM 2:25 Keywords holds at most 64 bytes per keyword.
IPTC_KEYWORD_LIMIT = 64


def clean_keyword(keyword: str) -> str:
    """``keyword`` as capwatch writes it (see the module docstring); "" when nothing is left."""
    text = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in keyword)
    text = "".join(ch for ch in text if xml_char(ch))
    return " ".join(unicodedata.normalize("NFC", text).split())


def clean_keywords(keywords: Iterable[str]) -> tuple[str, ...]:
    """Cleaned, non-empty keywords, de-duplicated case-insensitively (the first spelling wins), in order."""
    return dedupe(k for k in map(clean_keyword, keywords) if k)


def dedupe(keywords: Iterable[str]) -> tuple[str, ...]:
    """``keywords`` without case-insensitive repeats (the first spelling wins), in order."""
    seen: set[str] = set()
    out: list[str] = []
    for k in keywords:
        key = k.casefold()
        if key not in seen:
            seen.add(key)
            out.append(k)
    return tuple(out)


def key(keyword: str) -> str:
    """How keywords are compared for duplicates: NFC, surrounding whitespace ignored, case-folded, and characters
    XML cannot hold read as spaces (a person's IPTC keyword and its copy in XMP are the same keyword)."""
    return unicodedata.normalize("NFC", xml_safe(keyword)).strip().casefold()


def same_text(a: str, b: str) -> bool:
    """Exact identity of two keywords as capwatch records ownership: NFC, surrounding whitespace ignored."""
    return unicodedata.normalize("NFC", a).strip() == unicodedata.normalize("NFC", b).strip()


def iptc_bytes(keyword: str) -> bytes:
    """``keyword`` as an IPTC 2:25 value: UTF-8, cut to 64 bytes at a character boundary."""
    data = keyword.encode("utf-8")
    if len(data) <= IPTC_KEYWORD_LIMIT:
        return data
    return data[:IPTC_KEYWORD_LIMIT].decode("utf-8", errors="ignore").encode("utf-8")


def iptc_key(keyword: str) -> str:
    """The duplicate key of ``keyword`` as IPTC can hold it (its 64-byte cut)."""
    return key(iptc_bytes(keyword.strip()).decode("utf-8"))


def leaf(hierarchical: str) -> str:
    """The keyword a Lightroom ``lr:hierarchicalSubject`` entry names: its last ``|`` component, stripped."""
    return hierarchical.rsplit("|", 1)[-1].strip()


@dataclass(frozen=True)
class KeywordMerge:
    """The outcome of merging: ``human`` = which existing items are a person's (their indices in the input, so
    the caller keeps those items untouched), ``added_human`` = a person's keywords from another place of the same
    file (IPTC) to add, ``ours`` = capwatch's keywords to append, ``rejected`` = the new capwatch:RejectedKeywords."""

    human: tuple[int, ...]
    added_human: tuple[str, ...]
    ours: tuple[str, ...]
    rejected: tuple[str, ...]

    def subjects(self, existing: Sequence[str]) -> tuple[str, ...]:
        """The keyword list after the merge, given the same ``existing`` the merge was computed from."""
        return tuple(existing[i] for i in self.human) + self.added_human + self.ours


def owned(existing: Sequence[str], previous_ours: Sequence[str]) -> list[bool]:
    """For each existing keyword, whether it is capwatch's: each entry of ``previous_ours`` claims one item of the
    same text (a second copy of the same keyword is a person's)."""
    return _claimed(existing, Counter(unicodedata.normalize("NFC", k).strip() for k in previous_ours))


def owned_iptc(values: Sequence[str], previous_ours: Sequence[str]) -> list[bool]:
    """For each IPTC keyword, whether it is capwatch's: each entry of ``previous_ours`` claims one item equal to it
    or to its 64-byte cut (IPTC has no provenance of its own)."""
    return _claimed(values, Counter(unicodedata.normalize("NFC", iptc_bytes(k.strip()).decode("utf-8"))
                                    for k in previous_ours))


def _claimed(items: Sequence[str], claims: Counter[str]) -> list[bool]:
    """For each item, whether one of ``claims`` (consumed as they match) takes it."""
    out: list[bool] = []
    for item in items:
        text = unicodedata.normalize("NFC", item).strip()
        out.append(claims[text] > 0)
        if out[-1]:
            claims[text] -= 1
    return out


def iptc_deletions(subjects: Sequence[str], in_iptc: Sequence[str], previous_ours: Sequence[str], *,
                   digest: bool | None) -> tuple[str, ...]:
    """The keywords of dc:subject (``subjects``) that a person deleted from IPTC Keywords (``in_iptc``) only.

    ``digest`` is what the Photoshop IPTC digest says: True (IPTC unchanged since a writer that keeps XMP and IPTC
    in step last wrote it), False (a tool that does not, such as exiftool, edited IPTC since), None (no digest:
    no such writer ever wrote this IPTC, so neither list says what the other lost, and nothing counts as
    deleted). With a digest, one of capwatch's keywords (``previous_ours``) that IPTC no longer holds was deleted
    there: capwatch put it into both. With a stale digest IPTC's view is the newer one: every keyword of
    dc:subject that IPTC lacks (a person's too) was deleted there. Never raises.
    """
    if digest is None:
        return ()
    held = {key(v) for v in in_iptc}

    def gone(keyword: str) -> bool:
        return key(keyword) not in held and iptc_key(keyword) not in held

    candidates = list(previous_ours) if digest else [*previous_ours, *subjects]
    return dedupe(k for k in candidates if k.strip() and gone(k))


def merge(existing: Sequence[str], previous_ours: Sequence[str], rejected: Sequence[str], wanted: Sequence[str],
          *, other_human: Sequence[str] = (), deleted: Sequence[str] = ()) -> KeywordMerge:
    """Merge ``wanted`` (capwatch's new keywords, already cleaned) into ``existing`` (a dc:subject list).

    ``previous_ours`` is the recorded capwatch:Keywords, ``rejected`` the recorded capwatch:RejectedKeywords,
    ``other_human`` a person's keywords found elsewhere in the same file (IPTC), which join the list so that the
    places agree, and ``deleted`` keywords a person deleted in that other place (:func:`iptc_deletions`): they
    leave the list, whoever's they were, and join the rejected ones. Returns the KeywordMerge (see the module
    docstring for the rules); never raises.
    """
    gone = {key(k) for k in deleted}
    mine = owned(existing, previous_ours)
    human = tuple(i for i, ours in enumerate(mine) if not ours and key(existing[i]) not in gone)
    present = Counter(unicodedata.normalize("NFC", item).strip() for item, ours in zip(existing, mine, strict=True)
                      if ours)
    removed: list[str] = []
    for k in previous_ours:
        text = unicodedata.normalize("NFC", k).strip()
        if present[text] > 0:
            present[text] -= 1
        else:
            removed.append(k)
    new_rejected = dedupe([*rejected, *removed, *deleted])
    taken = {key(existing[i]) for i in human}
    # IPTC holds a long keyword cut to 64 bytes: that cut is the same keyword, not another one.
    cuts = {iptc_key(existing[i]) for i in human}
    added_human: list[str] = []
    for k in other_human:
        if k.strip() and key(k) not in taken and key(k) not in cuts and key(k) not in gone:
            taken.add(key(k))
            # A person's IPTC keyword may hold bytes XML cannot (ESC, NUL): its XMP copy has spaces there; the
            # IPTC value itself stays as it is.
            added_human.append(xml_safe(k))
    refused = {key(k) for k in new_rejected}
    ours: list[str] = []
    for k in wanted:
        if key(k) not in taken and key(k) not in refused:
            taken.add(key(k))
            ours.append(k)
    return KeywordMerge(human, tuple(added_human), tuple(ours), new_rejected)
