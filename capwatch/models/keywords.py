"""Keywords from detected object labels: lower-case, singular, de-duplicated, largest objects first.

:func:`singular` is a small rule-based English singulariser for nouns as detectors name them ("people", "wheels",
"boxes", "puppies", "traffic lights"): irregular plurals from a table, words that are the same in both numbers left
alone, then the regular suffix rules. Only the last word of a label is a head noun, so only it is changed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from capwatch.models.florence_post import Detection

#: Irregular plurals (and -f/-fe nouns, whose plural the suffix rules cannot undo).
IRREGULAR: Mapping[str, str] = {
    "people": "person", "men": "man", "women": "woman", "children": "child", "feet": "foot", "teeth": "tooth",
    "geese": "goose", "mice": "mouse", "oxen": "ox", "lice": "louse", "dice": "die", "cacti": "cactus",
    "fungi": "fungus", "knives": "knife", "leaves": "leaf", "wolves": "wolf", "lives": "life", "wives": "wife",
    "halves": "half", "shelves": "shelf", "loaves": "loaf", "calves": "calf", "scarves": "scarf",
    "thieves": "thief", "elves": "elf", "hooves": "hoof", "buses": "bus", "lenses": "lens", "gases": "gas",
    "canvases": "canvas", "quizzes": "quiz", "criteria": "criterion", "phenomena": "phenomenon",
    "indices": "index", "matrices": "matrix", "vertices": "vertex", "analyses": "analysis", "axes": "axis",
    "crises": "crisis", "oases": "oasis", "radii": "radius", "alumni": "alumnus",
}

#: Nouns whose plural is the word itself, or that are only used in the plural ("jeans", "scissors").
INVARIANT: frozenset[str] = frozenset({
    "sheep", "deer", "fish", "moose", "bison", "salmon", "trout", "shrimp", "squid", "swine", "aircraft",
    "spacecraft", "series", "species", "means", "news", "scissors", "pants", "jeans", "shorts", "trousers",
    "glasses", "sunglasses", "eyeglasses", "goggles", "binoculars", "clothes", "headphones", "earphones",
    "tongs", "pliers", "shears", "tweezers", "pajamas", "pyjamas", "leggings", "tights", "stairs", "mathematics",
    "physics", "athletics", "gymnastics", "electronics", "graphics", "tennis", "billiards", "darts", "chess",
    "lens", "bus", "gas", "canvas", "cactus", "octopus", "status", "campus",
    "virus", "bonus", "circus", "walrus", "citrus", "hummus", "asparagus", "hippopotamus", "platypus",
    "christmas", "always", "overalls", "sweatpants", "furniture", "luggage", "equipment", "information",
})

#: Singular nouns ending in -che / -oe / -ie whose plurals the -ches/-oes/-ies rules would get wrong.
_ES_KEEPS_E: frozenset[str] = frozenset({
    "headaches", "moustaches", "mustaches", "niches", "caches", "avalanches", "quiches", "cliches", "aches",
    "shoes", "toes", "canoes", "hoes", "oboes", "horseshoes", "tiptoes", "floes", "foes", "woes",
})

_WORD_RE = re.compile(r"[a-z]+")


def singular(word: str) -> str:
    """The singular of an English noun given in lower case (unchanged when it does not look plural)."""
    if len(word) <= 3 or not _WORD_RE.fullmatch(word) or word in INVARIANT:
        return word
    if word in IRREGULAR:
        return IRREGULAR[word]
    if word in _ES_KEEPS_E:
        return word[:-1]
    if word.endswith("ies"):
        # puppies -> puppy, cherries -> cherry; ties, pies: the -ie is the word's own
        return word[:-3] + "y" if len(word) > 4 else word[:-1]
    if word.endswith(("sses", "shes", "ches", "xes", "zzes")):
        return word[:-2]
    if word.endswith("oes"):
        return word[:-2]  # tomatoes, potatoes, heroes (shoes, toes: _ES_KEEPS_E)
    if word.endswith(("ss", "us", "is", "ous", "ics")):
        return word  # glass, walrus, tennis, ...: not plurals
    if word.endswith("s") and not word.endswith("'s"):
        return word[:-1]
    return word


def normalise_label(label: str) -> str:
    """A detector label as a keyword: lower case, whitespace collapsed, the last word singular.

    Returns "" for a label with no letter, or one holding pieces of markup (``<``, ``>``: the parser takes the text
    after a malformed location token as part of the label, as transformers' does).
    """
    words = label.lower().split()
    if not words or "<" in label or ">" in label or not any(c.isalpha() for c in label):
        return ""
    words[-1] = singular(words[-1])
    return " ".join(words)


@dataclass
class _Tally:
    area: int = 0
    count: int = 0
    first: int = 0


def keywords_from_detections(detections: Iterable[Detection], limit: int) -> tuple[str, ...]:
    """At most ``limit`` keywords from ``detections``: one per normalised label, ordered by the total area of its
    boxes (largest first), then by how many boxes it has, then by first appearance. Empty labels are skipped."""
    tally: dict[str, _Tally] = {}
    for position, detection in enumerate(detections):
        keyword = normalise_label(detection.label)
        if not keyword:
            continue
        entry = tally.setdefault(keyword, _Tally(first=position))
        entry.area += detection.area
        entry.count += 1
    ranked = sorted(tally, key=lambda k: (-tally[k].area, -tally[k].count, tally[k].first))
    return tuple(ranked[: max(0, limit)])
