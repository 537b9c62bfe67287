"""`capwatch models list|pull|info`."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import TYPE_CHECKING

import click

from capwatch.cli.app import _global_options, _human_bytes, _load, cli
from capwatch.errors import CapwatchError

if TYPE_CHECKING:
    from capwatch.config import Config

# -- models -----------------------------------------------------------------------------------------------------




@cli.group()
def models() -> None:
    """List, download and inspect captioning, embedding and translation models."""


@models.command("list")
@_global_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per model.")
@click.pass_context
def models_list(ctx: click.Context, as_json: bool) -> None:
    """Known models, which one is the default, and what is in the local cache.

    Captioning models (kind caption, [model]) come first, then image–text embedding models (kind embed, [embed])
    and translation models (kind translate, [language] models); "*" marks the ones the configuration uses.
    """
    from capwatch.models.store import list_models

    config = _load(ctx)
    for status in list_models(os.environ):
        if as_json:
            click.echo(json.dumps(dataclasses.asdict(status)))
            continue
        if status.kind == "embed":
            used = status.name == config.embed.model and config.embed.dir is None and not config.embed.off
        elif status.kind == "translate":
            used = status.name in _translation_names(config)
        else:
            used = status.name == config.model.name and config.model.dir is None
        chosen = "*" if used else " "
        cached = ",".join(status.cached_precisions) if status.cached_precisions else "-"
        default = "default" if status.default else ""
        click.echo(f"{chosen} {status.name:<20} {default:<8} {status.family:<23} cached: {cached:<14} "
                   f"{_human_bytes(status.bytes_on_disk):>9}  {status.description}")


def _translation_names(config: Config) -> set[str]:
    """The registry names of the translation models the configuration uses."""
    from capwatch.models.languages import model_reference

    names: set[str] = set()
    for language in config.language.translated:
        try:
            ref = model_reference(config.language, language, None)
        except CapwatchError:
            continue  # a language no model is known for: `scan` says so; the list just marks none
        if isinstance(ref, str):
            names.add(ref)
    return names


@models.command("pull")
@_global_options
@click.argument("name")
@click.option("--precision", type=click.Choice(["fp32", "int8", "fp16"]), help="Default: the configured one.")
@click.pass_context
def models_pull(ctx: click.Context, name: str, precision: str | None) -> None:
    """Download model NAME into the cache (resumable; every file verified by sha256).

    Set HF_ENDPOINT to use a mirror and HF_TOKEN for a token; CAPWATCH_OFFLINE=1 forbids any download.
    """
    from capwatch.models.registry import get_spec, precision_key
    from capwatch.models.store import pull, wanted_precision

    config = _load(ctx)
    show = sys.stderr.isatty()

    def progress(file: str, done: int, total: int) -> None:
        if show:
            pct = f"{100 * done / total:5.1f}%" if total else ""
            click.echo(f"\r{file}: {_human_bytes(done)} of {_human_bytes(total)} {pct}   ", err=True, nl=False)

    # --precision names the precision of every graph; otherwise the configured precision applies, and the
    # configured graph_precision too when NAME is the configured model (its graph names may not exist in another)
    spec = get_spec(name)
    if precision:
        wanted = precision_key(precision)
    elif spec.kind == "embed":
        # an embedding model: [embed] precision, whether or not it is the configured one
        embed_precision = config.embed.precision
        wanted = spec.default_key if embed_precision == "auto" else precision_key(embed_precision)
    elif name == config.model.name and config.model.dir is None:
        wanted = wanted_precision(get_spec(name), config.model)
    else:
        wanted = wanted_precision(get_spec(name), dataclasses.replace(config.model, graph_precision={}))
    resolved = pull(name, wanted, os.environ, progress=progress)
    if show:
        click.echo("", err=True)
    commit = f" (commit {resolved.revision[:12]})" if resolved.revision else ""
    click.echo(f"{name} {resolved.precision} -> {resolved.dir}{commit}")


def _providers_line(requested: tuple[str, ...]) -> str:
    """Where the configured model.providers make the model run, and what this onnxruntime has."""
    from capwatch.models.runtime import ort
    from capwatch.models.session import resolve_providers, short_provider

    chosen, missing = resolve_providers(requested)
    have = ", ".join(short_provider(p) for p in ort.get_available_providers())
    line = f"{short_provider(chosen[0])} (this onnxruntime has: {have})"
    return line + (f"; not available: {', '.join(missing)}" if missing else "")


@models.command("info")
@_global_options
@click.argument("name_or_dir")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.pass_context
def models_info(ctx: click.Context, name_or_dir: str, as_json: bool) -> None:
    """Details of a known model or of any model directory."""
    from capwatch.models.session import resolve_providers, short_provider
    from capwatch.models.store import model_info

    config = _load(ctx)
    info = model_info(name_or_dir, os.environ)
    if as_json:
        chosen, missing = resolve_providers(config.model.providers)
        click.echo(json.dumps({**info.to_dict(), "provider": short_provider(chosen[0]), "providers_missing": missing},
                              ensure_ascii=False))
        return
    lines: list[tuple[str, object]] = [
        ("name", info.name or "-"),
        ("repo", f"{info.repo}@{info.revision}" if info.repo else "-"),
        ("commit", info.commit or "-"),
        ("dir", info.dir or "not downloaded"),
        ("family", f"{info.family} ({info.model_type})" if info.model_type else info.family or "-"),
    ]
    for prec in info.precisions:
        state = "complete" if prec.complete else "incomplete"
        if prec.verified:
            state += ", verified"
        lines.append((f"  {prec.precision}", f"{_human_bytes(prec.bytes)} in {len(prec.files)} graph files, {state}"))
    for prec_name, size in info.approx_bytes:
        if not any(p.precision == prec_name for p in info.precisions):
            lines.append((f"  {prec_name}", f"~{_human_bytes(size)} to download"))
    lines += [
        ("tokenizer", info.tokenizer or "-"),
        ("special tokens", ", ".join(f"{k}={v}" for k, v in info.special_tokens) or "-"),
        ("image size", "x".join(map(str, info.image_size)) if info.image_size else "-"),
        ("generation", ", ".join(f"{k}={v}" for k, v in info.generation) or "-"),
        ("task prompts", ", ".join(f"{k} {v!r}" for k, v in info.task_prompts) or "-"),
        ("licence", info.licence or "-"),
        ("about", info.description or "-"),
        ("runs on", _providers_line(config.model.providers)),
    ]
    for key, value in lines:
        click.echo(f"{key:<16} {value}")
