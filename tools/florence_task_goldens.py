"""transformers' own outputs for Florence-2's keyword (<OD>) and text (<OCR>) tasks, as goldens for the tests.

Usage (needs the ``export`` extra: torch, transformers)::

    python tools/florence_task_goldens.py [--fixture tests/fixtures/models/florence2-tiny]

Writes

* ``tests/fixtures/florence_post_goldens.json``: a table of realistic ``<OD>`` / ``<OCR>`` outputs (as transformers'
  ``batch_decode(..., skip_special_tokens=False)`` gives them) with the answer of transformers'
  ``Florence2Processor.post_process_generation(text, task=..., image_size=...)`` for each: labels and boxes for
  ``<OD>``, the text for ``<OCR>``. Random tiny weights rarely emit well-formed detections, so the parser is checked
  on this table too.
* ``<fixture>/goldens_tasks.json``: for the tiny fixture's golden pixels, transformers' native
  ``Florence2ForConditionalGeneration.generate()`` token ids for the ``<OD>`` and ``<OCR>`` prompts (greedy and
  beam), the decoded text, and ``post_process_generation``'s labels/boxes at each golden image's size.
  The torch model is rebuilt from the fixture's spec and seed (tools/fixtures_florence.py) and first checked
  against the committed caption goldens, so the task goldens belong to the committed ONNX graphs.
* ``<fixture>/preprocessor_config.json``: the <OD>/<OCR> prompts added to its prompt table (as the real models'
  configs carry them); the rest of the fixture is left as it is.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import GenerationConfig, PreTrainedTokenizerFast
from transformers.models.florence2.processing_florence2 import Florence2PostProcessor, Florence2Processor

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "models" / "florence2-tiny"
POST_GOLDENS = REPO / "tests" / "fixtures" / "florence_post_goldens.json"
TASKS = ("<OD>", "<OCR>")


def _fixtures_florence() -> Any:
    spec = importlib.util.spec_from_file_location("fixtures_florence", REPO / "tools" / "fixtures_florence.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fixtures_florence"] = module
    spec.loader.exec_module(module)
    return module


def tokenizer(model_dir: Path) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"), bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


def processor(tok: PreTrainedTokenizerFast) -> Florence2Processor:
    """A Florence2Processor whose post_process_generation is transformers' own (only the parts it uses are set:
    the task table and the post-processor; the image side is not needed to parse text)."""
    proc = Florence2Processor.__new__(Florence2Processor)
    proc.tasks_answer_post_processing_type = {"<OD>": "description_with_bboxes", "<OCR>": "pure_text"}
    # The real models' processor configs enable these parse tasks (post_processor_config); none needs settings here.
    proc.post_processor = Florence2PostProcessor(config={"description_with_bboxes": {}, "pure_text": {}},
                                                 tokenizer=tok)
    return proc


#: Realistic outputs, as decoded by transformers (special tokens kept), and the image size they are scaled to.
POST_CASES: list[dict[str, Any]] = [
    {"task": "<OD>", "size": [640, 480], "text": "</s><s>car<loc_52><loc_333><loc_932><loc_774>door<loc_171><loc_365>"
     "<loc_310><loc_736>wheel<loc_117><loc_559><loc_263><loc_770><loc_673><loc_556><loc_824><loc_770></s>"},
    {"task": "<OD>", "size": [1024, 768], "text": "</s><s>person<loc_100><loc_200><loc_300><loc_900>person<loc_400>"
     "<loc_210><loc_590><loc_880>dog<loc_600><loc_600><loc_800><loc_950>traffic light<loc_5><loc_6><loc_40><loc_90>"
     "</s>"},
    {"task": "<OD>", "size": [4032, 3024], "text": "</s><s>human face<loc_400><loc_100><loc_600><loc_380>"
     "sunglasses<loc_420><loc_200><loc_590><loc_260>building<loc_0><loc_0><loc_999><loc_999></s>"},
    {"task": "<OD>", "size": [333, 777], "text": "</s><s> bananas<loc_1><loc_2><loc_3><loc_4>  apple <loc_10><loc_20>"
     "<loc_30><loc_40><loc_50></s><pad><pad>"},
    {"task": "<OD>", "size": [500, 500], "text": "</s><s>café<loc_10><loc_10><loc_500><loc_500>Straße<loc_5><loc_5>"
     "<loc_6><loc_6>日本<loc_1><loc_1><loc_2><loc_2></s>"},
    {"task": "<OD>", "size": [800, 600], "text": "</s><s>cat<loc_10><loc_10><loc_20></s>"},
    {"task": "<OD>", "size": [800, 600], "text": "</s><s></s>"},
    {"task": "<OD>", "size": [800, 600], "text": "</s><s><loc_10><loc_20><loc_30><loc_40>tree<loc_1><loc_2><loc_3>"
     "<loc_4></s>"},
    {"task": "<OD>", "size": [1, 1], "text": "</s><s>box<loc_999><loc_999><loc_0><loc_0>"},
    {"task": "<OD>", "size": [7, 3000], "text": "<s>sky<loc_0><loc_0><loc_999><loc_333>"
     "cloud<loc_100><loc_50><loc_300><loc_120>\ncloud<loc_500><loc_60><loc_700><loc_140></s>"},
    {"task": "<OD>", "size": [6000, 4000], "text": "</s><s>Car<loc_12><loc_34><loc_56><loc_78>CARS<loc_1><loc_1>"
     "<loc_998><loc_998>wheels<loc_100><loc_500><loc_200><loc_600><od>bus</od><loc_1><loc_2><loc_3><loc_4></s>"},
    {"task": "<OCR>", "size": [640, 480], "text": "</s><s>EXIT 12</s>"},
    {"task": "<OCR>", "size": [640, 480], "text": "</s><s>  Bäckerei Müller\nOPEN 24h </s>"},
    {"task": "<OCR>", "size": [640, 480], "text": "</s><s></s>"},
    {"task": "<OCR>", "size": [640, 480], "text": "</s><s>日本の桜<pad></s>"},
]


def post_goldens(proc: Florence2Processor) -> list[dict[str, Any]]:
    rows = []
    for case in POST_CASES:
        answer = proc.post_process_generation(case["text"], task=case["task"], image_size=tuple(case["size"]))
        rows.append({**case, "answer": answer[case["task"]]})
    return rows


def task_goldens(model_dir: Path, proc: Florence2Processor, tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    ff = _fixtures_florence()
    spec = next(s for s in ff.SPECS if s.name == model_dir.name)
    model = ff.build_model(spec, tok.backend_tokenizer.get_vocab_size(), tok.convert_tokens_to_ids("<image>"))
    model.eval()
    table = json.loads((model_dir / "goldens.json").read_text())
    pixels = torch.from_numpy(np.load(model_dir / table["pixels"]))
    gen = GenerationConfig(**json.loads((model_dir / "generation_config.json").read_text()))
    n_img = table["image_tokens"]

    def run(prompt_ids: list[int], beams: int) -> list[list[int]]:
        input_ids = torch.tensor([[model.config.image_token_id] * n_img + prompt_ids] * pixels.shape[0])
        with torch.no_grad():
            seqs = model.generate(input_ids=input_ids, pixel_values=pixels, attention_mask=torch.ones_like(input_ids),
                                  generation_config=gen, num_beams=beams)
        # generate() pads finished rows of a batch; cut at the first EOS after the decoder start.
        return [row[: row.index(2, 1) + 1] if 2 in row[1:] else row for row in seqs.tolist()]

    caption = table["tasks"]["<CAPTION>"]
    if run(caption["prompt_ids"], 1) != caption["greedy"]:
        raise SystemExit(f"{model_dir}: the rebuilt torch model does not reproduce the committed caption goldens")
    prompts = ff._task_prompts()
    sizes = [Image.open(model_dir / "goldens" / f"{name}.png").size for name in table["images"]]
    out: dict[str, Any] = {"images": table["images"], "sizes": sizes, "tasks": {}}
    for task in TASKS:
        prompt_ids = tok("<s>" + prompts[task] + "</s>", add_special_tokens=False)["input_ids"]
        entry: dict[str, Any] = {"prompt": prompts[task], "prompt_ids": prompt_ids}
        for mode, beams in (("greedy", 1), ("beam", 3)):
            rows = run(prompt_ids, beams)
            texts = tok.batch_decode(rows, skip_special_tokens=False)
            entry[mode] = rows
            entry[f"text_{mode}"] = texts
            entry[f"answer_{mode}"] = [proc.post_process_generation(t, task=task, image_size=size)[task]
                                       for t, size in zip(texts, sizes, strict=True)]
        out["tasks"][task] = entry
    return out


def add_task_prompts(model_dir: Path) -> None:
    """Add transformers' <OD>/<OCR> prompts and answer types to the fixture's preprocessor_config.json."""
    path = model_dir / "preprocessor_config.json"
    config = json.loads(path.read_text())
    prompts = _fixtures_florence()._task_prompts()
    for task in TASKS:
        config["task_prompts_without_inputs"][task] = prompts[task]
    config["tasks_answer_post_processing_type"].update({"<OD>": "description_with_bboxes", "<OCR>": "pure_text"})
    path.write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixture", type=Path, default=FIXTURE)
    ns = parser.parse_args()
    torch.set_num_threads(1)
    tok = tokenizer(ns.fixture)
    proc = processor(tok)
    POST_GOLDENS.write_text(json.dumps(post_goldens(proc), indent=1, ensure_ascii=False) + "\n")
    goldens = task_goldens(ns.fixture, proc, tok)
    (ns.fixture / "goldens_tasks.json").write_text(json.dumps(goldens, indent=1, ensure_ascii=False) + "\n")
    add_task_prompts(ns.fixture)
    for task, entry in goldens["tasks"].items():
        for mode in ("greedy", "beam"):
            labels = [a["labels"] if isinstance(a, dict) else a for a in entry[f"answer_{mode}"]]
            print(task, mode, [len(r) for r in entry[mode]], labels)


if __name__ == "__main__":
    main()
