"""The registry of named models: names, revisions, file names per precision, pins, defaults."""

from __future__ import annotations

import re
from typing import get_args

import pytest

from capwatch.config import CaptionLength, ModelConfig, Precision
from capwatch.errors import ModelError
from capwatch.models.registry import (
    CAPTION_MODELS,
    FAMILY_GRAPHS,
    PRECISION_SUFFIX,
    REGISTRY,
    TRANSLATION_LANGUAGES,
    TRANSLATION_REGISTRY,
    ModelSpec,
    default_spec,
    get_spec,
    graph_files,
    is_commit,
    translation_model_name,
)

SHARED = ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
          "tokenizer_config.json")
#: Embedding models generate nothing: no generation_config.json, and special_tokens_map.json may carry the pad token.
EMBED_SHARED = ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json")


def test_names_are_unique_and_the_default_is_florence_2_base_ft() -> None:
    names = [spec.name for spec in REGISTRY]
    assert len(names) == len(set(names))
    assert {"florence-2-base-ft", "florence-2-large-ft", "vit-gpt2"} <= set(names)
    assert [spec.name for spec in REGISTRY if spec.default and spec.kind == "caption"] == ["florence-2-base-ft"]
    assert default_spec().name == "florence-2-base-ft"
    # the configuration's built-in default model must be something the store can pull
    assert get_spec(ModelConfig().name) == default_spec()


@pytest.mark.parametrize(("name", "repo"), [
    ("florence-2-base-ft", "onnx-community/Florence-2-base-ft"),
    ("florence-2-large-ft", "onnx-community/Florence-2-large-ft"),
    ("vit-gpt2", "Xenova/vit-gpt2-image-captioning"),
])
def test_each_model_points_at_its_published_repository_pinned_to_a_commit(name: str, repo: str) -> None:
    spec = get_spec(name)
    assert spec.repo == repo
    assert is_commit(spec.revision) and spec.pinned


@pytest.mark.parametrize("spec", CAPTION_MODELS, ids=lambda s: s.name)
def test_files_per_precision_are_named_as_transformers_js_loads_them(spec: ModelSpec) -> None:
    for precision in spec.precision_names:
        paths = [f.path for f in spec.files(precision)]
        suffix = {"fp32": "", "int8": "_quantized", "fp16": "_fp16"}[precision]
        graphs = [f"onnx/{g}{suffix}.onnx" for g in FAMILY_GRAPHS[spec.family]]
        assert paths == [*(EMBED_SHARED if spec.kind == "embed" else SHARED), *graphs]
        assert len(paths) == len(set(paths))
    assert spec.default_precision in spec.precision_names
    required = [f.path for f in spec.files(spec.default_precision) if not f.optional]
    assert "tokenizer_config.json" not in required and "config.json" in required


@pytest.mark.parametrize("spec", TRANSLATION_REGISTRY, ids=lambda s: s.name)
def test_translation_models_are_xenova_opus_mt_in_the_transformers_js_layout(spec: ModelSpec) -> None:
    assert spec.family == "marian" and spec.repo == f"Xenova/{spec.name}" and spec.name.startswith("opus-mt-en-")
    assert spec.revision == "main" and not spec.pinned  # no public pin found: the hub's sums are checked
    files = [f.path for f in spec.files("int8")]
    assert files[:3] == ["config.json", "generation_config.json", "tokenizer.json"]
    assert files[-2:] == ["onnx/encoder_model_quantized.onnx", "onnx/decoder_model_merged_quantized.onnx"]
    assert "preprocessor_config.json" not in files
    optional = {f.path for f in spec.files("int8") if f.optional}
    assert optional == {"tokenizer_config.json", "source.spm", "vocab.json"}


def test_translation_model_names_by_language() -> None:
    assert translation_model_name("de") == "opus-mt-en-de"
    assert translation_model_name("ja") == "opus-mt-en-jap"
    assert translation_model_name("tlh") == ""
    assert all(get_spec(translation_model_name(lang)).family == "marian" for lang in TRANSLATION_LANGUAGES)
    assert REGISTRY == CAPTION_MODELS + TRANSLATION_REGISTRY


def test_family_graphs_match_the_onnx_layouts() -> None:
    assert FAMILY_GRAPHS["florence2"] == ("vision_encoder", "embed_tokens", "encoder_model", "decoder_model_merged")
    assert FAMILY_GRAPHS["vision-encoder-decoder"] == ("encoder_model", "decoder_model_merged")
    assert dict(PRECISION_SUFFIX) == {"fp32": "", "int8": "_quantized", "fp16": "_fp16"}
    assert set(PRECISION_SUFFIX) == set(get_args(Precision)) - {"auto"}  # auto is resolved, never a file suffix


def test_florence_models_offer_fp32_int8_and_fp16_and_vit_gpt2_fp32_and_int8() -> None:
    assert set(get_spec("florence-2-base-ft").precision_names) == {"fp32", "int8", "fp16"}
    assert set(get_spec("florence-2-large-ft").precision_names) == {"fp32", "int8", "fp16"}
    assert set(get_spec("vit-gpt2").precision_names) == {"fp32", "int8"}
    with pytest.raises(ModelError) as info:
        get_spec("vit-gpt2").files("fp16")
    assert "fp32" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("spec", REGISTRY, ids=lambda s: s.name)
def test_pins_are_well_formed(spec: ModelSpec) -> None:
    for precision in spec.precision_names:
        for file in spec.files(precision):
            if file.sha256 is not None:
                assert re.fullmatch(r"[0-9a-f]{64}", file.sha256)
            if file.size is not None:
                assert file.size > 0
        assert spec.precision(precision).approx_bytes > 0


def test_florence_base_int8_pins_add_up_to_the_recorded_download_size() -> None:
    spec = get_spec("florence-2-base-ft")
    files = spec.files("int8")
    assert all(f.sha256 and f.size for f in files)  # every file of the default download is pinned
    assert sum(f.size or 0 for f in files) == spec.precision("int8").approx_bytes == 277_470_179


def test_florence_task_prompts_cover_every_caption_length() -> None:
    for name in ("florence-2-base-ft", "florence-2-large-ft"):
        prompts = dict(get_spec(name).task_prompts)
        assert set(prompts) == set(get_args(CaptionLength))
        assert prompts["short"] == "<CAPTION>"
        assert prompts["detailed"] == "<DETAILED_CAPTION>"
        assert prompts["paragraph"] == "<MORE_DETAILED_CAPTION>"
    assert get_spec("vit-gpt2").task_prompts == ()


def test_unknown_name_is_one_line_listing_the_known_ones() -> None:
    with pytest.raises(ModelError) as info:
        get_spec("blip")
    text = str(info.value)
    assert "\n" not in text and "florence-2-base-ft" in text and "vit-gpt2" in text and "--model DIR" in text


def test_graph_files_apply_pins_by_path() -> None:
    pinned = graph_files("vision-encoder-decoder", "int8", {"onnx/encoder_model_quantized.onnx": (5, "a" * 64)})
    assert [(f.path, f.size, f.sha256) for f in pinned] == [
        ("onnx/encoder_model_quantized.onnx", 5, "a" * 64),
        ("onnx/decoder_model_merged_quantized.onnx", None, None),
    ]


def test_is_commit_accepts_only_full_hashes() -> None:
    assert is_commit("e88a44eaf3791a35eae0c5a47b3dbcd36e67eb6f")
    assert not is_commit("main")
    assert not is_commit("e88a44e")
    assert not is_commit("E88A44EAF3791A35EAE0C5A47B3DBCD36E67EB6F")


def test_embedding_models_are_their_own_kind_with_siglip2_the_default() -> None:
    from capwatch.config import DEFAULT_EMBED_MODEL, EmbedConfig

    embed = [spec for spec in REGISTRY if spec.kind == "embed"]
    assert {s.name for s in embed} >= {"siglip2-base", "clip-vit-b32"}
    assert [s.name for s in embed if s.default] == ["siglip2-base"] == [default_spec(kind="embed").name]
    assert get_spec(EmbedConfig().model) == default_spec(kind="embed") and DEFAULT_EMBED_MODEL == "siglip2-base"
    for spec in embed:
        assert spec.family in ("clip", "siglip") and FAMILY_GRAPHS[spec.family] == ("vision_model", "text_model")
        assert is_commit(spec.revision) and spec.pinned and spec.default_precision == "int8"
    assert get_spec("siglip2-base").repo == "onnx-community/siglip2-base-patch16-224-ONNX"
    assert get_spec("clip-vit-b32").repo == "Xenova/clip-vit-base-patch32"
    assert all(spec.kind == "caption" for spec in REGISTRY if spec.family in ("florence2", "vision-encoder-decoder"))
