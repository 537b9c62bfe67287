"""Detector labels -> keywords: singular, lower case, de-duplicated, largest objects first, capped."""

from __future__ import annotations

import pytest

from capwatch.models.florence_post import Detection
from capwatch.models.keywords import keywords_from_detections, normalise_label, singular


@pytest.mark.parametrize(("plural", "one"), [
    ("dogs", "dog"), ("puppies", "puppy"), ("cherries", "cherry"), ("ties", "tie"), ("boxes", "box"),
    ("benches", "bench"), ("dishes", "dish"), ("glasses", "glasses"), ("buses", "bus"), ("tomatoes", "tomato"),
    ("shoes", "shoe"), ("people", "person"), ("children", "child"), ("women", "woman"), ("knives", "knife"),
    ("leaves", "leaf"), ("sheep", "sheep"), ("mice", "mouse"), ("houses", "house"), ("horses", "horse"),
    ("olives", "olive"), ("headaches", "headache"), ("grass", "grass"), ("tennis", "tennis"), ("bus", "bus"),
    ("cactus", "cactus"), ("jeans", "jeans"), ("car", "car"), ("person", "person"), ("is", "is"),
    ("wheels", "wheel"), ("bananas", "banana"), ("species", "species"), ("analyses", "analysis"),
])
def test_singular(plural: str, one: str) -> None:
    assert singular(plural) == one


@pytest.mark.parametrize(("label", "keyword"), [
    ("Traffic Lights", "traffic light"), ("  human   face ", "human face"), ("", ""), ("123", ""),
    ("loc_767>ra", ""), ("tennis rackets", "tennis racket"), ("Sunglasses", "sunglasses"),
])
def test_normalise_label(label: str, keyword: str) -> None:
    assert normalise_label(label) == keyword


def _d(label: str, w: int, h: int) -> Detection:
    return Detection(label, (0, 0, w, h))


def test_order_by_total_area_then_count_then_first_seen() -> None:
    detections = [_d("tree", 10, 10), _d("Cars", 5, 10), _d("car", 5, 10), _d("sky", 10, 10),
                  _d("bird", 1, 1), _d("dog", 1, 1), _d("dog", 0, 5)]
    # tree and sky 100 (tree first), car 50+50=100 but two boxes: ranks before both; dog two boxes beats bird
    assert keywords_from_detections(detections, 10) == ("car", "tree", "sky", "dog", "bird")


def test_cap_and_empty_labels() -> None:
    detections = [_d(f"thing{i}", 10 - i, 1) for i in range(8)] + [_d("", 100, 100)]
    assert keywords_from_detections(detections, 3) == ("thing0", "thing1", "thing2")
    assert keywords_from_detections(detections, 0) == ()
    assert keywords_from_detections([], 10) == ()


def test_degenerate_box_has_no_area() -> None:
    assert Detection("x", (10, 10, 5, 20)).area == 0
    assert Detection("x", (1, 2, 4, 8)).area == 18
