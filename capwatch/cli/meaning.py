"""`capwatch similar` and `capwatch duplicates`: images compared by their embeddings."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from capwatch.cli.app import _global_options, _load, _open_index, cli
from capwatch.config import Config
from capwatch.errors import QueryError

if TYPE_CHECKING:
    from capwatch.library.index import Index


def _model_for(config: Config, index: Index) -> tuple[str, Any]:
    """The embedding model to compare with: the configured one when the index has its vectors (with the embedder,
    or None when it cannot be loaded), else the index's only model. Raises QueryError (one line) when the index
    holds no vectors, or vectors of several models of which none is the configured one."""
    from capwatch.library.embed import query_embedder
    from capwatch.library.vectors import Vectors

    models = Vectors(index).models()
    if not models:
        raise QueryError("no image in the index has an embedding yet: set [embed] model and run `capwatch scan`")
    embedder, _ = query_embedder(config)
    if embedder is not None and embedder.model_id in {m.model for m in models}:
        return embedder.model_id, embedder
    if len(models) == 1:
        return models[0].model, None
    raise QueryError(f"the index holds embeddings of {len(models)} models and none is the configured one "
                     f"({', '.join(m.model for m in models)}); set [embed] model to one of them")


@cli.command()
@_global_options
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="At most N images.")
@click.option("--json", "as_json", is_flag=True, help='One JSON object per line: {"path","similarity","caption"}.')
@click.pass_context
def similar(ctx: click.Context, file: Path, limit: int, as_json: bool) -> None:
    """The indexed images most like FILE (by their embeddings), most similar first; FILE itself is left out.

    FILE need not be indexed: it is embedded now with the configured model.

    \b
    Examples:
      capwatch similar ~/Pictures/2023/beach.jpg --limit 5
      capwatch similar photo.jpg --json | jq -r .path
    """
    from capwatch.errors import ImageError
    from capwatch.library.index import normalise_path
    from capwatch.library.moments import nearest_assets
    from capwatch.library.vectors import Vectors

    config = _load(ctx)
    if not file.is_file():
        raise QueryError(f"{file}: no such file" if not file.exists() else f"{file}: not a regular file")
    with _open_index(config, readonly=True) as index:
        model, embedder = _model_for(config, index)
        store = Vectors(index)
        path = normalise_path(file)
        vector = store.vector_of(path, model)
        if vector is None:
            if embedder is None:
                raise QueryError(f"{file} is not embedded in the index and the embedding model cannot be loaded "
                                 "here to embed it")
            from capwatch.models.preprocess import load_image

            try:
                image = load_image(file, target_size=embedder.preprocessor.output_size)
            except ImageError as exc:
                raise QueryError(str(exc)) from None
            with image:
                vector = embedder.embed_images([image])[0]
        own = index.ids_for([path]).get(path)
        # A video once (at its best moment), and never FILE's own moments.
        near = [(h.image_id, h.similarity) for h in nearest_assets(store, index, model, vector, limit=limit,
                                                                    exclude=[own] if own is not None else [])]
        records = {i: index.get_by_id(i) for i, _ in near}
    out = sys.stdout
    for row_id, similarity in near:
        record = records.get(row_id)
        if record is None:
            continue
        if as_json:
            out.write(json.dumps({"path": record.path, "similarity": round(similarity, 6),
                                  "caption": record.caption}, ensure_ascii=False) + "\n")
        else:
            out.write(f"{similarity:.3f}  {record.path}\n")
            if record.caption:
                out.write(f"       {record.caption}\n")
    if not near and not as_json:
        click.echo("no other image has an embedding yet", err=True)


@cli.command()
@_global_options
@click.argument("dirs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--threshold", type=click.FloatRange(-1.0, 1.0), default=None,
              help="Cosine at or above which two images count as the same picture (default 0.95: copies, "
              "re-encodes and resizes; raise it to group only near-identical burst shots, lower it for looser "
              "bursts).")
@click.option("--json", "as_json", is_flag=True,
              help='One JSON object per group: {"similarity": lowest pair in the group, "paths": [...]}.')
@click.pass_context
def duplicates(ctx: click.Context, dirs: tuple[Path, ...], threshold: float | None, as_json: bool) -> None:
    """Groups of near-identical images (exact copies, re-encodes, resizes, burst shots) below DIRS (default:
    the whole index), most similar group first.

    \b
    Examples:
      capwatch duplicates ~/Pictures
      capwatch duplicates --threshold 0.98 --json
    """
    from capwatch.library.duplicates import DEFAULT_THRESHOLD, group
    from capwatch.library.vectors import Vectors

    config = _load(ctx)
    for directory in dirs:
        if not directory.is_dir():
            raise QueryError(f"{directory}: no such folder")
    with _open_index(config, readonly=True) as index:
        model, _ = _model_for(config, index)
        store = Vectors(index)
        roots: list[str | None] = [os.path.abspath(d) for d in dirs] or [None]
        paths: list[str] = []
        parts = []
        for root in roots:
            found, matrix = store.all_vectors(model, root)
            paths += found
            if found:
                parts.append(matrix)
    import numpy as np

    if not paths:
        groups = []
    else:
        matrix = np.concatenate(parts)
        first: dict[str, int] = {}
        for i, p in enumerate(paths):
            first.setdefault(p, i)  # DIRS inside one another: each image once
        keep = sorted(first.values())
        groups = group([paths[i] for i in keep], matrix[keep],
                       DEFAULT_THRESHOLD if threshold is None else threshold)
    out = sys.stdout
    for found_group in groups:
        if as_json:
            out.write(json.dumps({"similarity": round(found_group.similarity, 6),
                                  "paths": list(found_group.paths)}, ensure_ascii=False) + "\n")
        else:
            out.write(f"{len(found_group.paths)} images, similarity ≥ {found_group.similarity:.3f}\n")
            for path in found_group.paths:
                out.write(f"    {path}\n")
    if not groups and not as_json:
        click.echo("no near-identical images", err=True)
