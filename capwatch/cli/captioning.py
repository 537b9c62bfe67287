"""`capwatch caption`, `scan` and `recaption`: captioning files now, from the command line."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from capwatch.config import Config
from capwatch.metadata.formats import is_video_name

if TYPE_CHECKING:
    from capwatch.config import RootConfig
    from capwatch.library.fill import FillResult
    from capwatch.library.index import Index
    from capwatch.library.outcomes import FileOutcome
    from capwatch.library.process import Processor
    from capwatch.models.captioner import Captioner
    from capwatch.models.embedding import ImageTextEmbedder

from capwatch.cli.app import _global_options, _load, _open_captioner, _open_index, _roots, cli, log

# -- caption ----------------------------------------------------------------------------------------------------


def _emit(outcome: FileOutcome, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(outcome.as_json(), ensure_ascii=False))
    elif outcome.error:
        _report_failure(outcome.path, outcome.error)
    else:
        note = f"  [{outcome.skipped}]" if outcome.skipped else ""
        written = f"  (written: {', '.join(outcome.written)})" if outcome.written else ""
        click.echo(f"{outcome.path}: {outcome.caption or ''}{written}{note}")
        if outcome.keywords:
            click.echo(f"  keywords: {', '.join(outcome.keywords)}")
        if outcome.text:
            click.echo(f"  text: {' '.join(outcome.text.split())}")


@cli.command()
@_global_options
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--dry-run", is_flag=True, help="Print captions; write nothing into files or the index.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file: path, caption, model, written, "
              "skipped, error, keywords, text.")
@click.option("--force", is_flag=True, help="Replace descriptions people wrote too: their words are lost.")
@click.pass_context
def caption(ctx: click.Context, files: tuple[Path, ...], dry_run: bool, as_json: bool, force: bool) -> None:
    """Caption FILES now: write the caption into each file and the index (unless --dry-run).

    A symlink is followed: the file it points to is written and the link stays a link. A file that another
    program changes while it is being captioned is read and captioned again; nothing is written over a change.
    """
    config = _load(ctx)
    unusable = _nothing_to_caption(files)
    if unusable:
        for outcome in unusable:
            _emit(outcome, as_json)
        ctx.exit(1)
    if not dry_run:
        _recover_writes()
    captioner = _open_captioner(config)
    failed = False
    with _maybe_index(config, dry_run) as index:
        processor = _processor(config, index, captioner, dry_run=dry_run, force=force)
        size = max(1, config.model.batch_size)
        try:
            for start in range(0, len(files), size):
                processor.decode_ahead(files[start + size:start + 2 * size])  # decoded while this one is captioned
                for outcome in processor.process(files[start:start + size], skip_captioned=False):
                    failed |= outcome.error is not None
                    _emit(outcome, as_json)
        finally:
            processor.close()
    captioner.close()
    ctx.exit(1 if failed else 0)


def _nothing_to_caption(files: Sequence[Path]) -> list[FileOutcome]:
    """When none of ``files`` names a regular file (each is missing, unreachable, a folder, ...), return their
    failed outcomes in order; otherwise an empty list, and the processor reports the bad ones among the others.

    Asked before anything else, so a typo costs neither a model download nor a model load. Never raises.
    """
    from capwatch.library.outcomes import FileOutcome
    from capwatch.library.process import stat_file

    checked = [stat_file(path) for path in files]
    failed = [c for c in checked if isinstance(c, FileOutcome)]
    return failed if len(failed) == len(checked) else []


def _recover_writes() -> None:
    """Settle writes a killed capwatch left behind (every writing command starts with this)."""
    from capwatch.library.process import recover_writes

    recover_writes(log)


def _processor(config: Config, index: Index | None, captioner: Captioner, *, dry_run: bool = False,
               force: bool = False, embedder: ImageTextEmbedder | None = None, read_text: bool = True
               ) -> Processor:
    """A processor for these files; it embeds every image it reads when an index is written and the embedding
    model can be had (``embedder``, else the configured one); ``read_text`` False: no OCR engine here (the
    cluster's workers read the text)."""
    from capwatch.library.embed import open_embedder_if_available
    from capwatch.library.process import Processor, hooks_from_env
    from capwatch.metadata import Journal
    from capwatch.models.languages import open_translations

    if embedder is None and index is not None and not dry_run:
        embedder = open_embedder_if_available(config)
    translations = open_translations(config, os.environ, download=True)
    return Processor(config, index, captioner, dry_run=dry_run, force=force, journal=Journal.default(),
                     hooks=hooks_from_env(os.environ), embedder=embedder, translations=translations,
                     read_text=read_text)


@contextmanager
def _maybe_index(config: Config, skip: bool) -> Iterator[Index | None]:
    if skip:
        yield None
        return
    index = _open_index(config)
    try:
        yield index
    finally:
        index.close()


# -- scan -------------------------------------------------------------------------------------------------------




class _Progress:
    """A one-line counter on a TTY (stderr), silent otherwise."""

    def __init__(self, label: str) -> None:
        self.enabled = sys.stderr.isatty()
        self.label = label
        self.started = time.monotonic()

    def __call__(self, count: int) -> None:
        if self.enabled:
            rate = count / max(time.monotonic() - self.started, 1e-6)
            click.echo(f"\r{self.label}: {count} files ({rate:,.0f}/s)   ", err=True, nl=False)

    def done(self) -> None:
        if self.enabled:
            click.echo("", err=True)


@cli.command()
@_global_options
@click.argument("dirs", nargs=-1, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--no-caption", is_flag=True, help="Only index: record images and import existing descriptions.")
@click.option("--force", is_flag=True, help="Caption every file again and REPLACE DESCRIPTIONS PEOPLE WROTE: their "
              "words are lost. To redo only capwatch's own captions use `capwatch recaption`.")
@click.option("--cluster", "cluster", metavar="tcp://HOST:PORT", help="Caption on the workers of this Dask scheduler "
              "(default: [cluster] scheduler); this machine still writes files and index. Needs capwatch[cluster].")
@click.pass_context
def scan(ctx: click.Context, dirs: tuple[Path, ...], no_caption: bool, force: bool, cluster: str | None) -> None:
    """Reconcile DIRS (default: configured roots) with the index, then caption what needs it.

    Unchanged files are skipped by their state alone (size, times, sidecars); moved files keep their captions;
    descriptions already in the files are imported and searchable at once. Safe to interrupt and run again:
    a write cut short is finished or undone by the next run.
    """
    from capwatch.library.scan import reconcile

    config = _load(ctx)
    roots = _roots(config, dirs)
    scheduler = cluster or config.cluster.scheduler
    if scheduler and not no_caption:
        _require_cluster()  # a missing extra is said before a long reconcile, not after it
    _recover_writes()
    totals: dict[str, int] = {"seen": 0, "new": 0, "changed": 0, "moved": 0, "removed": 0, "imported": 0,
                              "boilerplate": 0, "errors": 0, "videos": 0}
    to_caption: list[Path] = []
    missing: list[str] = []
    missing_paths: set[Path] = set()
    with _open_index(config) as index:
        for root in roots:
            progress = _Progress(f"scanning {root.path}")
            result = reconcile(root, config, index, progress=progress)
            progress.done()
            if result.root_missing:
                problem = result.root_problem or "missing"
                problem += " (unmounted?)" if problem == "empty" else ""
                kept = f"its {result.kept} indexed images were kept until it is back" if result.kept \
                    else "nothing is indexed there"
                missing.append(f"{root.path} is {problem}; {kept}")
                missing_paths.add(root.path)
                continue
            if dirs:
                index.add_owner_roots([root.path])  # scanned by hand: the owner's folder, shown by `serve` too
            totals["seen"] += result.seen
            totals["videos"] += result.videos
            totals["new"] += len(result.new)
            totals["changed"] += len(result.changed)
            totals["moved"] += len(result.moved)
            totals["removed"] += len(result.removed)
            totals["imported"] += result.imported
            totals["boilerplate"] += result.boilerplate
            totals["errors"] += len(result.errors)
            for path, message in result.errors:
                _report_failure(path, message)
            to_caption.extend(result.to_caption)
            if force:
                to_caption.extend(Path(r.path) for r in index.iter_records(root.path)
                                  if r.status in ("captioned", "described", "error"))
        captioned = failed = embedded = 0
        embedder = None if no_caption else _embedder(config)
        if not no_caption and to_caption:
            if scheduler:
                captioned, failed = _caption_on_cluster(config, index, to_caption, force, scheduler)
            else:
                captioned, failed = _caption_all(config, index, to_caption, force, embedder)
        present = [root for root in roots if root.path not in missing_paths]
        filled = _fill_in(config, index, present) if not no_caption else None
        if embedder is not None:
            # Every indexed image below the roots gets its embedding, without being captioned again (a library
            # captioned before search by meaning was on, a person's photo, a cluster run).
            embedded, embed_failures = _fill_embeddings(index, embedder, [r.path for r in roots if r.path])
            failed += len(embed_failures)
            _prepare_for_queries(embedder)
        # Files that failed in an earlier run and have not changed since are not retried by a scan.
        failed_rows = sum(1 for root in roots for _ in index.iter_records(root.path, status="error"))
    for missing_root in missing:
        click.echo(f"capwatch: warning: {missing_root}", err=True)
    # "N images: ..." as before; with videos among them "N files (V videos): ..." (as recaption says it).
    seen = f"{totals['seen']} files ({totals['videos']} video{'s' if totals['videos'] != 1 else ''})" \
        if totals["videos"] else f"{totals['seen']} images"
    summary = (f"{seen}: {totals['new']} new, {totals['changed']} changed, "
               f"{totals['moved']} moved, {totals['removed']} removed, {totals['imported']} descriptions imported")
    if no_caption:
        summary += f"; {len(to_caption)} waiting for a caption"
        if totals["boilerplate"]:
            summary += f" ({totals['boilerplate']} of them with camera boilerplate only)"
    else:
        summary += f"; {captioned} captioned"
    if filled is not None and filled.rows:
        kinds = ", ".join(f"{kind} {count}" for kind, count in filled.by_kind)
        summary += f"; {filled.rows} filled in without captioning again ({kinds})"
    if embedded:
        summary += f", {embedded} embedded"
    failures = totals["errors"] + failed + (len(filled.failed) if filled is not None else 0)
    if failures:
        summary += f"; {failures} failed (listed above)"
    if earlier_failures := max(0, failed_rows - failures):
        summary += f"; {earlier_failures} failed before and are unchanged since (retry: capwatch recaption --errors)"
    click.echo(summary)
    ctx.exit(1 if failures or missing else 0)


def _fill_in(config: Config, index: Index, roots: Sequence[RootConfig]) -> FillResult:
    """Fill in what the indexed files below ``roots`` lack for the current settings (text in the image, the
    model's keywords: capwatch.library.fill), without captioning them again; report each file that failed."""
    from capwatch.library.fill import Filler, FillResult

    filler = Filler(config, index, lambda: _open_captioner(config))
    total = FillResult()
    try:
        for root in roots:
            rows = filler.todo(index.iter_records(root.path))
            if not rows:
                continue
            progress = _Progress(f"filling in {root.path}")
            result = filler.fill(rows, progress=progress)
            progress.done()
            kinds = dict(total.by_kind)
            for kind, count in result.by_kind:
                kinds[kind] = kinds.get(kind, 0) + count
            total = FillResult(rows=total.rows + result.rows, by_kind=tuple(kinds.items()),
                               failed=total.failed + result.failed)
    finally:
        filler.close()
    for path, message in total.failed:
        _report_failure(path, message)
    return total


def _report_failure(path: str | Path, message: str) -> None:
    """One line on stderr per failed file (messages usually start with the path already)."""
    text = message.removeprefix(f"{path}: ")
    click.echo(f"{path}: error: {text}", err=True)


def _embedder(config: Config) -> ImageTextEmbedder | None:
    from capwatch.library.embed import open_embedder_if_available

    return open_embedder_if_available(config)


def _prepare_for_queries(embedder: ImageTextEmbedder) -> None:
    """Make the text graph's pre-optimised form (capwatch.models.derived) at the end of a scan, once per model:
    the first `capwatch search` would otherwise make it (~2 s). A model that cannot be read is the search's to
    report: one log line here."""
    from capwatch.errors import ModelError

    try:
        embedder.prepare_for_queries()
    except ModelError as exc:
        log.warning("search by meaning: %s", exc)


def _fill_embeddings(index: Index, embedder: ImageTextEmbedder, roots: Sequence[Path]
                     ) -> tuple[int, list[tuple[str, str]]]:
    from capwatch.library.embed import fill_missing

    progress = _Progress("embedding")
    done, failures = fill_missing(index, embedder, roots, progress=progress)
    progress.done()
    for path, message in failures:
        _report_failure(path, message)
    return done, failures


def _caption_all(config: Config, index: Index, paths: list[Path], force: bool,
                 embedder: ImageTextEmbedder | None = None) -> tuple[int, int]:
    captioner = _open_captioner(config)
    try:
        tally = _caption_many(_processor(config, index, captioner, force=force, embedder=embedder), paths,
                              skip_captioned=not force)
    finally:
        captioner.close()
    return tally.captioned, tally.failed


@dataclass
class _Tally:
    """What a run over many files did: captioned (new words written or recorded), kept (a person's description
    left alone), unchanged (the same caption again), failed."""

    captioned: int = 0
    kept: int = 0
    unchanged: int = 0
    failed: int = 0

    def count(self, outcome: FileOutcome, failures: list[tuple[Path, str]]) -> None:
        """Count ``outcome``; a failure is also added to ``failures`` (reported at the end)."""
        from capwatch.library.outcomes import HUMAN_KEPT

        if outcome.error:
            self.failed += 1
            failures.append((outcome.path, outcome.error))
        elif outcome.skipped == HUMAN_KEPT:
            self.kept += 1
        elif outcome.written or (outcome.caption and not outcome.skipped):
            self.captioned += 1
        else:
            self.unchanged += 1


def _caption_many(processor: Processor, paths: list[Path], *, skip_captioned: bool,
                  label: str = "captioning") -> _Tally:
    """Process ``paths`` in batches with a progress bar on a TTY; report each failure in one line at the end."""
    size = max(1, processor.config.model.batch_size)
    tally = _Tally()
    failures: list[tuple[Path, str]] = []
    show = sys.stderr.isatty()
    started = time.monotonic()
    bar_ctx = click.progressbar(length=len(paths), label=label, file=sys.stderr, show_eta=True,
                                show_pos=True, item_show_func=lambda rate: rate) if show else None
    try:
        for start in range(0, len(paths), size):
            processor.decode_ahead(paths[start + size:start + 2 * size])  # decoded while this chunk is captioned
            outcomes = processor.process(paths[start:start + size], skip_captioned=skip_captioned)
            for outcome in outcomes:
                tally.count(outcome, failures)
            if bar_ctx is not None:
                done = start + len(outcomes)
                rate = 60 * done / max(time.monotonic() - started, 1e-6)
                bar_ctx.update(len(outcomes), f"{rate:,.1f} img/min")
    finally:
        processor.close()
        if bar_ctx is not None:
            bar_ctx.render_finish()
    for path, message in failures:
        _report_failure(path, message)
    return tally


def _require_cluster() -> None:
    """Raise UsageError (exit 2) when capwatch.cluster cannot be imported: the extra it needs is not installed."""
    try:
        import capwatch.cluster  # noqa: F401
    except ImportError:
        from capwatch.paths import install_hint

        raise click.UsageError(f"--cluster needs Dask distributed: {install_hint('cluster')}") from None


def _caption_on_cluster(config: Config, index: Index, paths: list[Path], force: bool, scheduler: str
                        ) -> tuple[int, int]:
    """Caption ``paths`` on the Dask workers of ``scheduler``, writing here (capwatch.cluster); progress bar with
    the workers' rates on a TTY, one log line per worker at the end. Returns (captioned, failed).

    Raises ClusterError/ModelError (exit 2) when the cluster cannot be used, ClusterLost (exit 1) when the
    scheduler goes away mid-run (what was written stays; a new scan finishes the rest)."""
    _require_cluster()
    from capwatch import cluster as dask_cluster

    settings = config.cluster
    captioner = _open_captioner(config)  # identity (model, revision) for provenance; not loaded here
    # The workers read every text (photos and each video's frames): the coordinator opens no OCR engine.
    processor = _processor(config, index, captioner, force=force, read_text=False)
    tally = _Tally()
    failures: list[tuple[Path, str]] = []
    show = sys.stderr.isatty()
    started = time.monotonic()
    bar_ctx = click.progressbar(length=len(paths), label="captioning on the cluster", file=sys.stderr,
                                show_eta=True, show_pos=True, item_show_func=lambda text: text) if show else None

    def on_outcomes(outcomes: Sequence[FileOutcome], run: dask_cluster.ClusterRun) -> None:
        for outcome in outcomes:
            tally.count(outcome, failures)
        if bar_ctx is not None:
            rate = 60 * sum(w.images for w in run.workers.values()) / max(time.monotonic() - started, 1e-6)
            workers = " / ".join(f"{w.rate * 60:,.0f}" for w in run.workers.values())
            bar_ctx.update(len(outcomes), f"{rate:,.1f} img/min; {len(run.workers)} workers: {workers} img/min each")

    try:
        with dask_cluster.connect(scheduler, timeout=settings.connect_timeout_seconds,
                                  verbose=log.isEnabledFor(logging.DEBUG)) as client:
            embedder = processor.embedder
            request = dask_cluster.model_request(
                captioner, config.model, processor.describe,
                embed=(config.embed, embedder.model_id) if embedder is not None else None, ocr=config.ocr)
            workers = dask_cluster.install(client, request, wait_seconds=settings.worker_wait_seconds)
            log.debug("captioning on %d Dask worker(s) of %s with %s", len(workers), scheduler, request.describe())
            run = dask_cluster.caption_on_cluster(client, processor, paths, skip_captioned=not force,
                                                  batches_per_worker=settings.batches_per_worker,
                                                  on_outcomes=on_outcomes,
                                                  worker_wait_seconds=settings.worker_wait_seconds)
    finally:
        processor.close()
        captioner.close()
        if bar_ctx is not None:
            bar_ctx.render_finish()
        for path, message in failures:
            _report_failure(path, message)
    for address, stats in sorted(run.workers.items()):
        log.info("worker %s: %d images in %.1f s of work (%.2f img/s)", address, stats.images, stats.seconds,
                 stats.rate)
    return tally.captioned, tally.failed


# -- recaption --------------------------------------------------------------------------------------------------


def _current_model(config: Config) -> tuple[str, str | None]:
    """The model id and revision captions would be made with now, without loading or downloading anything."""
    from capwatch.errors import ModelError
    from capwatch.models.store import model_spec, resolve_model

    if config.model.dir is not None:
        resolved = resolve_model(config.model, os.environ)
        return resolved.model_id, resolved.revision
    spec = model_spec(config.model)  # a registry name, or a [model] repo the registry does not know
    try:
        resolved = resolve_model(config.model, os.environ)
        return resolved.model_id, resolved.revision
    except ModelError:
        return spec.repo, spec.revision if spec.pinned else None


def _model_ids(names: Sequence[str]) -> frozenset[str]:
    """Model ids as the index records them for each name given: a registry name stands for its repository."""
    from capwatch.models.registry import REGISTRY

    ids = set(names)
    ids.update(spec.repo for spec in REGISTRY if spec.name in names)
    return frozenset(ids)


@cli.command()
@_global_options
@click.argument("dirs", nargs=-1, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model-changed", is_flag=True,
              help="Captions made by another model, or another revision of it, than the one configured now, or "
                   "lacking a language of [language] captions (added languages are translated).")
@click.option("--from-model", "from_model", multiple=True, metavar="NAME",
              help="Captions made by this model: a name from `capwatch models list`, a repository id, or a model "
                   "directory's name (repeatable).")
@click.option("--before", metavar="DATE", help="Captions made before DATE (YYYY, YYYY-MM-DD, 30d, ...).")
@click.option("--errors", is_flag=True, help="Retry the files whose last attempt failed.")
@click.option("--dry-run", is_flag=True, help="List the files that would be captioned again; change nothing.")
@click.pass_context
def recaption(ctx: click.Context, dirs: tuple[Path, ...], model_changed: bool, from_model: tuple[str, ...],
              before: str | None, errors: bool, dry_run: bool) -> None:
    """Caption again the files in DIRS (default: configured roots, else the whole index) whose caption capwatch
    wrote, as chosen.

    A description a person wrote is never replaced: every file is read again first, so words added since the
    last scan are kept too (use `scan --force` to replace people's words). Criteria combine: --model-changed
    --before 2024 takes captions of another model made before 2024; --errors adds the failed files. Safe to
    interrupt and run again: files already done are not chosen again.

    \b
    Examples:
      capwatch recaption --model-changed            # after switching models
      capwatch recaption --from-model vit-gpt2 ~/Pictures/2023
      capwatch recaption --errors                   # retry what failed
    """
    from capwatch.library.recaption import make_criteria, select

    config = _load(ctx)
    # Without DIRS: the configured roots, or else everything the index holds.
    roots = [Path(r.path) for r in _roots(config, dirs)] if dirs or config.library.roots else None
    current = _current_model(config) if model_changed else None
    criteria = make_criteria(model_changed=model_changed, current=current, from_model=_model_ids(from_model),
                             before=before, errors=errors, languages=config.language.languages)
    if dry_run:
        with _open_index(config, readonly=True) as index:
            chosen = list(select(index, roots, criteria))
        for record in chosen:
            made_by = " ".join(part for part in (record.model or "?", (record.model_revision or "")[:12]) if part)
            why = f"failed: {record.error}" if record.status == "error" else \
                f"{made_by}, {record.captioned_at or '?'}"
            click.echo(f"{record.path}  ({why})")
        click.echo(f"{len(chosen)} files would be captioned again")
        return
    _recover_writes()
    with _open_index(config) as index:
        chosen_paths = [Path(r.path) for r in select(index, roots, criteria)]
        if not chosen_paths:
            click.echo("0 files to caption again")
            return
        captioner = _open_captioner(config)
        try:
            tally = _caption_many(_processor(config, index, captioner), chosen_paths, skip_captioned=False,
                                  label="re-captioning")
        finally:
            captioner.close()
    summary = f"{len(chosen_paths)} files: {tally.captioned} captioned again"
    if videos := sum(is_video_name(p.name) for p in chosen_paths):
        summary = f"{len(chosen_paths)} files ({videos} videos): {tally.captioned} captioned again"
    if tally.unchanged:
        summary += f", {tally.unchanged} unchanged (the same caption)"
    if tally.kept:
        summary += f", {tally.kept} kept (a person's description)"
    if tally.failed:
        summary += f"; {tally.failed} failed (listed above)"
    click.echo(summary)
    ctx.exit(1 if tally.failed else 0)
