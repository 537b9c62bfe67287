"""Process captioning jobs end to end: policy, caption, write into the file, record in the index.

Per file: stat -> read metadata -> policy (a person's description is kept; an unchanged file we already captioned
is skipped) -> decode and preprocess -> caption (batched) -> write metadata (atomic) -> fingerprint and stat taken
AFTER the write, so the watcher recognises our own write -> index upsert. One bad file never fails the others.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capwatch.config import Config
from capwatch.errors import CapwatchError, ImageError
from capwatch.fingerprint import fingerprint_file
from capwatch.index import ImageRecord, Index, normalise_path
from capwatch.metadata import FileMetadata, Provenance, read_metadata, write_caption
from capwatch.scan import is_utf8_path, printable_path

if TYPE_CHECKING:
    from capwatch.models.captioner import Captioner

log = logging.getLogger(__name__)

HUMAN_KEPT = "has a description written by a person; kept (use --force to replace it)"
ALREADY_CAPTIONED = "already captioned by capwatch and unchanged"


@dataclass(frozen=True)
class FileOutcome:
    """What happened to one file; ``as_json`` gives the `caption --json` line of the CLI contract."""

    path: Path
    caption: str | None
    model: str | None
    written: tuple[str, ...] = ()
    skipped: str | None = None
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "caption": self.caption, "model": self.model,
                "written": list(self.written), "skipped": self.skipped, "error": self.error}


@dataclass(frozen=True)
class _Job:
    path: str
    st: os.stat_result
    meta: FileMetadata
    previous: ImageRecord | None
    #: The person's description stays in the file; the caption goes to the index only (model_caption).
    index_only: bool
    human_skip: bool


def _now_iso(clock: Callable[[], float]) -> str:
    return dt.datetime.fromtimestamp(clock(), dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def clean_caption(text: str) -> str:
    """The caption as it is stored and written: NFC, control characters dropped, whitespace collapsed, first
    letter capitalised. (Byte-level BPE can decode to control bytes, which XML and EXIF readers reject.)"""
    text = unicodedata.normalize("NFC", text)
    text = "".join(" " if ch.isspace() else ch for ch in text
                   if ch.isspace() or unicodedata.category(ch) not in ("Cc", "Cs", "Cn"))
    text = " ".join(text.split())
    return text[:1].upper() + text[1:]


class Processor:
    """Runs jobs against one index and one captioner with one configuration.

    ``index`` may be None (nothing recorded). ``dry_run`` captions but writes neither files nor index.
    ``force`` replaces a person's description too (the user said so).
    """

    def __init__(self, config: Config, index: Index | None, captioner: Captioner, *, dry_run: bool = False,
                 force: bool = False, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.index = index
        self.captioner = captioner
        self.dry_run = dry_run
        self.force = force
        self.clock = clock

    def process_batch(self, paths: Sequence[Path], *, skip_captioned: bool = True) -> list[FileOutcome]:
        """Caption ``paths`` (in batches of ``model.batch_size``) and return one outcome per path, in order.

        ``skip_captioned`` skips files whose index row already holds our caption for the same content.
        Never raises for a single bad file; raises ModelError when the model itself cannot run and
        IndexUnavailable when the index cannot be written.
        """
        outcomes: dict[int, FileOutcome] = {}
        jobs: list[tuple[int, _Job]] = []
        for position, path in enumerate(paths):
            result = self._prepare(Path(path), skip_captioned)
            if isinstance(result, FileOutcome):
                outcomes[position] = result
            else:
                jobs.append((position, result))
        size = max(1, self.config.model.batch_size)
        for start in range(0, len(jobs), size):
            for position, outcome in self._caption_chunk(jobs[start:start + size]):
                outcomes[position] = outcome
        return [outcomes[i] for i in range(len(paths))]

    # -- steps ----------------------------------------------------------------------------------------------

    def _fail(self, path: str, message: str, st: os.stat_result | None = None) -> FileOutcome:
        log.warning("%s", message)
        if self.index is not None and not self.dry_run:
            if self.index.get(path) is None and st is not None:
                self.index.upsert(ImageRecord(path=path, size=st.st_size, mtime_ns=st.st_mtime_ns,
                                              status="error", error=message))
            else:
                self.index.set_error(path, message)
        return FileOutcome(Path(path), None, None, error=message)

    def _prepare(self, path: Path, skip_captioned: bool) -> _Job | FileOutcome:
        spath = normalise_path(path)
        if not is_utf8_path(spath):
            return FileOutcome(Path(printable_path(spath)), None, None,
                               error=f"{printable_path(spath)}: the file name is not valid UTF-8; rename it")
        try:
            st = os.stat(spath)
        except FileNotFoundError:
            return FileOutcome(Path(spath), None, None, error=f"{spath}: no such file")
        except OSError as exc:
            return FileOutcome(Path(spath), None, None, error=f"{spath}: {exc.strerror or exc}")
        if not os.path.isfile(spath):
            return FileOutcome(Path(spath), None, None, error=f"{spath}: not a regular file")
        try:
            meta = read_metadata(Path(spath))
        except CapwatchError as exc:
            return self._fail(spath, str(exc), st)
        previous = self.index.get(spath) if self.index is not None else None
        desc = meta.description
        if skip_captioned and not self.force and previous is not None and previous.status == "captioned" \
                and previous.source == "model" and (previous.size, previous.mtime_ns) == (st.st_size, st.st_mtime_ns):
            return FileOutcome(Path(spath), previous.caption, previous.model, skipped=ALREADY_CAPTIONED)
        human = desc is not None and desc.kind == "human"
        keep = human and not self.force and self.config.metadata.existing == "keep"
        index_only = keep and self.config.metadata.index_only_when_described
        if keep and not index_only and not self.dry_run:
            if self.index is not None and desc is not None:
                try:
                    fingerprint = fingerprint_file(spath)
                except OSError as exc:
                    return FileOutcome(Path(spath), None, None, error=f"{spath}: {exc.strerror or exc}")
                self.index.upsert(self._base_record(spath, st, meta, previous, fingerprint))
            return FileOutcome(Path(spath), None, None, skipped=HUMAN_KEPT)
        return _Job(spath, st, meta, previous, index_only=index_only, human_skip=keep and not index_only)

    def _caption_chunk(self, chunk: list[tuple[int, _Job]]) -> list[tuple[int, FileOutcome]]:
        import numpy as np

        results: list[tuple[int, FileOutcome]] = []
        ready: list[tuple[int, _Job]] = []
        tensors = []
        for position, job in chunk:
            try:
                tensors.append(self.captioner.preprocess_file(Path(job.path)))
                ready.append((position, job))
            except ImageError as exc:
                results.append((position, self._fail(job.path, str(exc), job.st)))
            except OSError as exc:
                results.append((position, self._fail(job.path, f"{job.path}: {exc.strerror or exc}", job.st)))
        if not ready:
            return results
        captions = self.captioner.caption_pixels(np.stack(tensors))
        for (position, job), caption in zip(ready, captions, strict=True):
            results.append((position, self._finish(job, clean_caption(caption.text))))
        return results

    def _finish(self, job: _Job, text: str) -> FileOutcome:
        model_id = self.captioner.model_id
        if not text:
            # Nothing to write or search; recorded as an error so that `status` shows it and --force retries it.
            return self._fail(job.path, f"{job.path}: the model produced an empty caption", job.st)
        if self.dry_run:
            return FileOutcome(Path(job.path), text, model_id, skipped=HUMAN_KEPT if job.human_skip else None)
        now = _now_iso(self.clock)
        written: tuple[str, ...] = ()
        skipped: str | None = None
        write_error: str | None = None
        if job.index_only:
            skipped = "has a description written by a person; caption kept in the index only"
        else:
            provenance = Provenance(model=model_id, revision=self.captioner.revision, created_at=now)
            try:
                result = write_caption(Path(job.path), text, provenance, self.config.metadata, force=self.force)
                written, skipped = result.written, result.skipped
            except CapwatchError as exc:
                write_error = str(exc)
        try:
            # Taken after the write: the watcher sees our write as "unchanged" and does not caption again.
            st = os.stat(job.path)
            fingerprint = fingerprint_file(job.path)
        except OSError as exc:
            return self._fail(job.path, f"{job.path}: vanished after captioning ({exc.strerror or exc})")
        base = self._base_record(job.path, st, job.meta, job.previous, fingerprint)
        if job.index_only:
            record = replace(base, model_caption=text, model=model_id, model_revision=self.captioner.revision,
                             captioned_at=now)
        elif skipped is not None and not written and job.meta.description is not None \
                and job.meta.description.kind == "human":
            record = base  # the writer found a person's description after all: theirs stays the caption
        else:
            record = replace(base, caption=text, source="model", status="captioned", model=model_id,
                             model_revision=self.captioner.revision, captioned_at=now, error=None)
        if write_error is not None:
            record = replace(record, status="error", error=write_error)
            log.warning("%s", write_error)
        if self.index is not None:
            self.index.upsert(record)
        return FileOutcome(Path(job.path), text, model_id, written=written, skipped=skipped, error=write_error)

    def _base_record(self, path: str, st: os.stat_result, meta: FileMetadata, previous: ImageRecord | None,
                     fingerprint: str) -> ImageRecord:
        from capwatch.scan import record_from_metadata

        return record_from_metadata(path, st, meta, fingerprint, previous, self.config)
