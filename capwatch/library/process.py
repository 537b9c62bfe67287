"""Process captioning jobs end to end: policy, caption, write into the file, record in the index.

Per file: read a snapshot (metadata, identity, sidecars) -> policy (a person's description is kept; an unchanged
file we already captioned is skipped) -> decode and preprocess -> caption (batched) -> write metadata as a
transaction against that snapshot -> record in the index what the file holds AFTER the write (its snapshot, so
the watcher recognises our own write). A file that changed while the model ran is not written: its outcome says
``changed`` and the caller reads it again. One bad file never fails the others.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shlex
import stat
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capwatch.config import Config
from capwatch.errors import CapwatchError, ImageError
from capwatch.library.ahead import ReadAhead
from capwatch.library.embed import embed_paths, embed_pixels, lacking, moments_of_frames
from capwatch.library.embed import store as store_vectors
from capwatch.library.index import ImageRecord, Index, normalise_path
from capwatch.library.livephoto import record_pair, still_by_content, still_of
from capwatch.library.moments import VideoMoments
from capwatch.library.outcomes import (
    ALREADY_CAPTIONED,
    HUMAN_KEPT,
    INDEX_ONLY,
    LIVE_MOTION,
    WRITING_OFF,
    Described,
    FileOutcome,
    clean_caption,
)
from capwatch.library.scan import (
    FILLED_KEYWORDS,
    FILLED_TEXT,
    is_utf8_path,
    moved_on,
    printable_path,
    record_from_snapshot,
    with_filled,
    with_index_only_keywords,
)
from capwatch.library.videos import describe_frames, is_video, read_frames_text
from capwatch.metadata import (
    CaptionWrite,
    FileChanged,
    FileSnapshot,
    Journal,
    Provenance,
    WriteHooks,
    WriteResult,
    read_snapshot,
    write_captions,
)
from capwatch.metadata.safeopen import file_kind

if TYPE_CHECKING:
    from capwatch.models.captioner import Captioner
    from capwatch.models.embedding import ImageTextEmbedder
    from capwatch.models.frames import VideoFrames
    from capwatch.models.languages import Translations
    from capwatch.text.threaded import OffThreadReader

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class _Job:
    path: str
    snap: FileSnapshot
    previous: ImageRecord | None
    #: The person's description stays in the file; the caption goes to the index only (model_caption).
    index_only: bool
    human_skip: bool


#: A file that needs a caption, as read before the model runs (see Processor.prepare): its snapshot is what the
#: write is checked against.
Job = _Job


def hooks_from_env(env: Mapping[str, str]) -> WriteHooks:
    """Write hooks from ``$CAPWATCH_HOOK_BEFORE_WRITE`` / ``$CAPWATCH_HOOK_BEFORE_COMMIT``: each a command that is
    run (and waited for) with the file's path appended, at that moment of every write. For tests and debugging:
    they let a real editor (exiftool, exiv2, a copy) change the file exactly while capwatch works on it."""

    def hook(command: str | None) -> Callable[[Path], None] | None:
        if not command:
            return None
        argv = shlex.split(command)

        def run(path: Path) -> None:
            try:
                subprocess.run([*argv, os.fspath(path)], check=False)
            except OSError as exc:
                log.warning("write hook %r could not run: %s", command, exc.strerror or exc)

        return run

    return WriteHooks(before_write=hook(env.get("CAPWATCH_HOOK_BEFORE_WRITE")),
                      before_commit=hook(env.get("CAPWATCH_HOOK_BEFORE_COMMIT")))


def stat_file(path: str | Path) -> tuple[str, os.stat_result] | FileOutcome:
    """Return the stored form of ``path`` and its stat when it names a regular file (a symlink to one included),
    else the failed outcome saying why: a name that is not UTF-8, no such file, not reachable, not a regular file
    (a folder, a device). Never raises; `caption` asks this before it loads a model."""
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
    if not stat.S_ISREG(st.st_mode):
        what = ("is a folder, not an image file" if stat.S_ISDIR(st.st_mode)
                else f"not a regular file ({file_kind(st.st_mode)})")
        return FileOutcome(Path(spath), None, None, error=f"{spath}: {what}")
    return spath, st


def _now_iso(clock: Callable[[], float]) -> str:
    return dt.datetime.fromtimestamp(clock(), dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class Processor:
    """Runs jobs against one index and one captioner with one configuration.

    ``index`` may be None (nothing recorded). ``dry_run`` captions but writes neither files nor index.
    ``force`` replaces a person's description too (the user said so). ``journal`` registers every temp file and
    backup (default: this user's); ``hooks`` run at the critical moments of each write (tests). ``read_text``
    False: the text of an OCR engine beside the model (``[ocr] engine = "rapidocr"``) is read elsewhere (the Dask
    workers of a cluster scan hand it to :meth:`complete`), so no engine is opened here at all.
    """

    def __init__(self, config: Config, index: Index | None, captioner: Captioner, *, dry_run: bool = False,
                 force: bool = False, clock: Callable[[], float] = time.time, journal: Journal | None = None,
                 hooks: WriteHooks | None = None, embedder: ImageTextEmbedder | None = None,
                 translations: Translations | None = None, read_text: bool = True) -> None:
        self.config = config
        #: The translation models of ``[language]`` (None: English alone).
        self.translations = translations
        self.index = index
        self.captioner = captioner
        #: Embeds every image it reads (captioned or not) from the same decode; None: no search by meaning.
        self.embedder = embedder
        self.dry_run = dry_run
        self.force = force
        self.clock = clock
        self.journal = journal if journal is not None else Journal.default()
        self.hooks = hooks if hooks is not None else WriteHooks()
        # Imported here: the model layer pulls in onnxruntime, which commands that never caption should not load.
        from capwatch.models.captioner import DescribeOptions
        from capwatch.models.frames import FrameCache

        #: A video's chosen frames, decoded once for its caption, keywords, text and moments: room for a batch and
        #: the next one decoded ahead (about 5 MB a video).
        self.frames = FrameCache(entries=2 * max(1, config.model.batch_size))
        #: The chosen frames of the videos of the batch being captioned, held until it is written (the decodes
        #: ahead for the next batch must not push them out of the cache meanwhile).
        self._held: dict[str, VideoFrames] = {}
        from capwatch.text import open_text_reader
        from capwatch.text.threaded import OffThreadReader

        #: What the model produces besides the caption ([model] keywords, [ocr] engine = "florence").
        self.describe = DescribeOptions.from_config(config)
        engine = open_text_reader(config) if config.ocr.engine == "rapidocr" and read_text else None
        #: The decodes (and OCR reads) made ahead of the model, at most ``4 * model.batch_size`` of each held.
        self.ahead = ReadAhead(captioner, embedder, self.frames, OffThreadReader(engine) if engine else None,
                               limit=4 * max(1, config.model.batch_size))
        #: path -> embedding, and a video's moments, for the batch being completed.
        self._vectors: dict[str, Any] = {}
        self._moments: dict[str, VideoMoments] = {}

    def decode_ahead(self, paths: Sequence[Path]) -> None:
        """Start decoding ``paths`` (JPEG decode, orientation, resize, normalise) on a background thread, so that
        they are ready when :meth:`process_batch` reaches them while the model is busy with the previous batch.

        Thread-safe; returns at once. Purely an optimisation: a path whose decode is not used (not processed, or
        the file changed meanwhile) costs only that decode. At most ``4 * model.batch_size`` decodes are held.
        With an OCR engine beside the model, the text in each file is read on the OCR thread too (at most as many
        texts held).
        """
        self.ahead.queue([normalise_path(path) for path in paths])

    @property
    def text_reader(self) -> OffThreadReader | None:
        """The OCR engine that runs beside the model ([ocr] engine = "rapidocr") on a thread of its own, fed from
        the decode-ahead side; Florence reads with the model. None (and no OCR thread): no such engine."""
        return self.ahead.text_reader

    @text_reader.setter
    def text_reader(self, reader: OffThreadReader | None) -> None:
        self.ahead.text_reader = reader

    @property
    def decoded_ahead(self) -> int:
        """Files whose decode made ahead was used (the rest were decoded in their turn)."""
        return self.ahead.decoded

    @property
    def text_read_ahead(self) -> int:
        """Files whose text read ahead on the OCR thread was used (the rest were read in their turn)."""
        return self.ahead.texts_used

    def close(self) -> None:
        """Stop the decode-ahead thread (decodes not taken are dropped)."""
        self.ahead.close()
        if self.text_reader is not None:
            self.text_reader.close()
        if self.translations is not None:
            self.translations.close()

    def process_batch(self, paths: Sequence[Path], *, skip_captioned: bool = True) -> list[FileOutcome]:
        """Caption ``paths`` (in batches of ``model.batch_size``) and return one outcome per path, in order.

        ``skip_captioned`` skips files that already carry a capwatch caption (recording what they hold) and files
        whose index row holds our caption for the same content.
        Never raises for a single bad file; raises ModelError when the model itself cannot run and
        IndexUnavailable when the index cannot be written.
        """
        outcomes, jobs = self.prepare(paths, skip_captioned=skip_captioned)
        size = max(1, self.config.model.batch_size)
        try:
            for start in range(0, len(jobs), size):
                for position, outcome in self._caption_chunk(jobs[start:start + size]):
                    outcomes[position] = outcome
            self._embed_uncaptioned([o for o in outcomes.values() if o.error is None and not o.changed])
        finally:
            # Decodes of files that did not reach the model (skipped, failed, kept) are dropped with the batch.
            self.ahead.drop([normalise_path(path) for path in paths])
        return [outcomes[i] for i in range(len(paths))]

    def prepare(self, paths: Sequence[Path], *, skip_captioned: bool = True
                ) -> tuple[dict[int, FileOutcome], list[tuple[int, _Job]]]:
        """Read each of ``paths`` (snapshot) and apply the policy: the outcomes of files settled without the model
        (skipped, kept, failed; by position in ``paths``) and the jobs that need a caption (with their position).

        The first half of :meth:`process_batch`, for a caller that has the captions made elsewhere (a Dask cluster,
        capwatch.cluster) and hands them to :meth:`complete`. Never raises for a single bad file.
        """
        outcomes: dict[int, FileOutcome] = {}
        jobs: list[tuple[int, _Job]] = []
        for position, path in enumerate(paths):
            result = self._prepare(Path(path), skip_captioned)
            if isinstance(result, FileOutcome):
                outcomes[position] = result
            else:
                jobs.append((position, result))
        return outcomes, jobs

    def complete(self, jobs: Sequence[tuple[int, _Job]], results: Sequence[Described | str | ImageError],
                 vectors: Sequence[Any] | None = None,
                 moments: Sequence[VideoMoments | None] | None = None, *,
                 text_read: Sequence[bool] | None = None, precision: str | None = None
                 ) -> list[tuple[int, FileOutcome]]:
        """Write the captions made for ``jobs`` (one model batch, see :meth:`prepare`) as a local scan writes them:
        group-committed into the files, each only if it still matches the snapshot it was read as, then recorded
        in the index. ``results`` holds per job what the model said (a Described, or the raw caption text
        alone), or the ImageError that made it impossible (the image could not be decoded), which is recorded as
        that file's error. With ``[ocr] engine = "rapidocr"`` the text in each image is the one read on the OCR
        thread (ahead, or now), except for the jobs whose ``text_read`` is True: their text was read elsewhere (on a
        Dask worker) and is taken as given (None: no text, the reading failed there).

        ``vectors`` (per job, the image embedding of the processor's embedder, None for a job without one) are
        stored for the files whose caption was recorded, with ``moments`` (per job: a video's other frames
        embedded, capwatch.library.moments; None for a photo). ``precision``: what the captions were made with,
        as recorded in each file's provenance (the worker's Captioner.precision_used); None: this processor's
        captioner's.

        Returns (position, outcome) per job. Raises IndexUnavailable when the index cannot be written.
        """
        failed: list[tuple[int, FileOutcome]] = []
        finished: list[tuple[int, _Job, Described]] = []
        if vectors is not None:
            self._vectors = {job.path: v for (_, job), v in zip(jobs, vectors, strict=True) if v is not None}
        if moments is not None:
            self._moments = {job.path: m for (_, job), m in zip(jobs, moments, strict=True) if m is not None}
        read_elsewhere = text_read if text_read is not None else [False] * len(jobs)
        for (position, job), result, read in zip(jobs, results, read_elsewhere, strict=True):
            if isinstance(result, ImageError):
                failed.append((position, self._fail(job.path, str(result), job.snap)))
            else:
                said = Described(result) if isinstance(result, str) else result
                said = replace(said, caption=clean_caption(said.caption))
                finished.append((position, job, said if read else self._with_text(job, said)))
        try:
            return failed + self._finish(self._translated(finished), precision)
        finally:
            self._vectors = {}
            self._moments = {}

    def _translated(self, finished: list[tuple[int, _Job, Described]]) -> list[tuple[int, _Job, Described]]:
        """The captions of one batch in every configured language (one translation call per language) and the
        keywords in the default language (each label translated once, then remembered). Raises ModelError when a
        translation model cannot run."""
        if self.translations is None or not finished:
            return finished
        english = [said.caption for _, _, said in finished]
        todo = [i for i, text in enumerate(english) if text]
        rows = self.translations.captions([english[i] for i in todo])
        out = list(finished)
        for i, row in zip(todo, rows, strict=True):
            position, job, said = finished[i]
            captions = tuple((lang, clean_caption(text, capitalise=lang == "en")) for lang, text in row.items()
                             if text.strip())
            keywords = self.translations.keywords(said.keywords) if said.keywords is not None else None
            out[i] = (position, job, replace(said, captions=captions, keywords=keywords))
        return out

    def _with_text(self, job: _Job, said: Described) -> Described:
        """``said`` with the text the OCR engine beside the model reads in the file: read ahead on the OCR thread
        when that was done on the same, settled file, else read there now (this thread waits); a video's in each of
        its chosen frames, merged after the model's own (the same here and for a batch captioned on a cluster). A
        failure of the OCR alone is logged in one line and costs only the text."""
        if self.text_reader is None:
            return said
        if is_video(job.path, job.snap.metadata.format):
            self.ahead.forget_text(job.path)
            return self._video_text(job, said)
        text, error = self.ahead.text(job.path, job.snap.identity)
        if error is not None:
            log.warning("no text read: %s", error if error.startswith(job.path) else f"{job.path}: {error}")
            return said
        return replace(said, text=text)

    def _video_text(self, job: _Job, said: Described) -> Described:
        """``said`` with the OCR engine's text of each of the video's chosen frames merged in (decoded once, through
        this processor's frame cache)."""
        assert self.text_reader is not None
        try:
            chosen = self._frames_of(job.path).chosen
        except ImageError as exc:
            log.warning("no text read: %s", exc)
            return said
        return replace(said, text=read_frames_text(said.text, [f.image for f in chosen], self.text_reader))

    def process(self, paths: Sequence[Path], *, skip_captioned: bool = True, attempts: int = 3) -> list[FileOutcome]:
        """Like :meth:`process_batch`, but a file that changed while it was being captioned is read and captioned
        again (up to ``attempts`` times in all); one that keeps changing ends as an error outcome (nothing
        written, nothing recorded: the next run takes it)."""
        outcomes = self.process_batch(paths, skip_captioned=skip_captioned)
        for _ in range(attempts - 1):
            again = [i for i, outcome in enumerate(outcomes) if outcome.changed]
            if not again:
                break
            redone = self.process_batch([paths[i] for i in again], skip_captioned=skip_captioned)
            for i, outcome in zip(again, redone, strict=True):
                outcomes[i] = outcome
        return [replace(o, error=f"{o.path}: kept changing while being captioned; nothing written (run again once "
                                 "it is done)") if o.changed else o for o in outcomes]

    # -- steps ----------------------------------------------------------------------------------------------

    def _fail(self, path: str, message: str, state: FileSnapshot | os.stat_result | None = None) -> FileOutcome:
        """Record ``message`` as the file's error (with the file's state when it failed) and return the outcome.
        Nothing is logged here: the caller reports each outcome once.

        A file that is no longer in ``state`` failed on content that is gone (a writer that closes, reopens and
        finishes a file had it read after the first close: "image file is truncated"): that is never an error;
        the outcome says ``changed`` and the file is read again."""
        if state is not None and _moved_on(path, state):
            return FileOutcome(Path(path), None, None, changed=True,
                               skipped=f"{path}: changed while it was being read; read again "
                                       f"(what the earlier version gave: {message.removeprefix(f'{path}: ')})")
        if self.index is not None and not self.dry_run:
            previous = self.index.get(path)
            if isinstance(state, FileSnapshot):
                size, mtime, ctime = state.identity.size, state.identity.mtime_ns, state.identity.ctime_ns
            elif state is not None:
                size, mtime, ctime = state.st_size, state.st_mtime_ns, state.st_ctime_ns
            if previous is None and state is not None:
                self.index.upsert(ImageRecord(path=path, size=size, mtime_ns=mtime, ctime_ns=ctime,
                                              status="error", error=message))
            elif previous is not None:
                self.index.set_error(path, message)
        return FileOutcome(Path(path), None, None, error=message)

    def _prepare(self, path: Path, skip_captioned: bool) -> _Job | FileOutcome:
        checked = stat_file(path)
        if isinstance(checked, FileOutcome):
            return checked
        spath, st = checked
        still = None if self.force else still_of(spath)
        if still is not None and still.suffix.lower().lstrip(".") in self.config.library.extensions:
            return FileOutcome(Path(spath), None, None, skipped=f"{LIVE_MOTION} {still.name}")
        try:
            snap = read_snapshot(Path(spath))
        except FileChanged as exc:
            return FileOutcome(Path(spath), None, None, skipped=str(exc), changed=True)
        except CapwatchError as exc:
            return self._fail(spath, str(exc), st)
        previous = self.index.get(spath) if self.index is not None else None
        if not self.force and still is None and snap.metadata.content_identifier and \
                snap.metadata.format in ("mp4", "mov"):
            paired = still_by_content(spath, snap.metadata.content_identifier, self.config.library.extensions,
                                      _content_identifier)
            if paired is not None:
                # One asset with its still: not a row of its own (a scan's walk may just have added one).
                if previous is not None and self.index is not None and not self.dry_run:
                    self.index.remove(spath)
                if self.index is not None and not self.dry_run:
                    # Shown with its still in search and on the page (the names do not tell).
                    record_pair(self.index, paired, spath)
                return FileOutcome(Path(spath), None, None, skipped=f"{LIVE_MOTION} {paired.name}")
        desc = snap.metadata.description
        if skip_captioned and not self.force:
            if desc is not None and desc.kind == "ours":
                # The file carries a capwatch caption (a sidecar or a rating edited, a copy from elsewhere):
                # record what it holds; captioning again is for `caption FILE`, --force and recaption.
                if self.index is not None and not self.dry_run:
                    self.index.upsert(record_from_snapshot(spath, snap, previous, self.config))
                return FileOutcome(Path(spath), desc.text, desc.provenance.model if desc.provenance else None,
                                   skipped=ALREADY_CAPTIONED, captions=snap.metadata.captions)
            if previous is not None and previous.status == "captioned" and previous.source == "model" \
                    and _same_content(previous, snap):
                return FileOutcome(Path(spath), previous.caption, previous.model, skipped=ALREADY_CAPTIONED)
        human = desc is not None and desc.kind == "human"
        keep = human and not self.force and self.config.metadata.existing == "keep"
        index_only = keep and self.config.metadata.index_only_when_described
        if keep and not index_only and not self.dry_run:
            if self.index is not None:
                self.index.upsert(record_from_snapshot(spath, snap, previous, self.config))
            return FileOutcome(Path(spath), None, None, skipped=HUMAN_KEPT)
        return _Job(spath, snap, previous, index_only=index_only, human_skip=keep and not index_only)

    def _caption_chunk(self, chunk: list[tuple[int, _Job]]) -> list[tuple[int, FileOutcome]]:
        import numpy as np

        results: list[tuple[int, FileOutcome]] = []
        ready: list[tuple[int, _Job]] = []
        tensors = []
        embed_inputs = []
        for position, job in chunk:
            try:
                caption_input, embed_input = self.ahead.pixels(job.path, job.snap.identity)
                tensors.append(caption_input)
                embed_inputs.append(embed_input)
                ready.append((position, job))
            except ImageError as exc:
                results.append((position, self._fail(job.path, str(exc), job.snap)))
            except OSError as exc:
                results.append((position, self._fail(job.path, f"{job.path}: {exc.strerror or exc}", job.snap)))
        if not ready:
            return results
        if self.text_reader is not None:
            # Read on the OCR thread while the model captions (files the decode-ahead side did not queue).
            self.ahead.queue_texts([job.path for _, job in ready if not is_video(job.path, job.snap.metadata.format)])
        descriptions = self.captioner.describe_pixels(np.stack(tensors), self.describe)
        keywords = self.describe.keywords and self.captioner.detects_objects
        said: list[Described | str | ImageError] = [
            Described(d.caption.text if d.caption is not None else "", d.keywords if keywords else None, d.text)
            for d in descriptions]
        for number, ((_, job), described) in enumerate(zip(ready, said, strict=True)):
            if isinstance(described, Described) and is_video(job.path, job.snap.metadata.format):
                said[number] = self._video_frames(job, described)
        vectors = None
        moments: list[VideoMoments | None] | None = None
        if self.embedder is not None and not self.dry_run:
            vectors = embed_pixels(self.embedder, embed_inputs)
            moments = [self._video_moments(job) if vectors is not None else None for _, job in ready]
        try:
            return results + self.complete(ready, said, vectors, moments)
        finally:
            self._held.clear()

    def _frames_of(self, path: str) -> VideoFrames:
        """The chosen frames of the video at ``path``: held for the batch, else through the cache. Raises
        ImageError."""
        held = self._held.get(path)
        return held if held is not None else self.frames.get(Path(path))

    def _video_frames(self, job: _Job, said: Described) -> Described | ImageError:
        """A video's description with the keywords and text of its other chosen frames merged in."""
        try:
            chosen = self._frames_of(job.path)
            self._held[job.path] = chosen
            # The OCR engine's text is read by _with_text, as for a batch captioned on a cluster.
            if not (said.keywords is not None or self.describe.text):
                return said
            return describe_frames([f.image for f in chosen.chosen], said, self.captioner, self.describe, None)
        except ImageError as exc:
            return exc

    def _video_moments(self, job: _Job) -> VideoMoments | None:
        """A video's other chosen frames embedded (None for a photo, or when the video cannot be decoded now:
        its caption reports that)."""
        assert self.embedder is not None
        if not is_video(job.path, job.snap.metadata.format):
            return None
        try:
            chosen = self._frames_of(job.path).chosen
        except ImageError:
            return None
        return moments_of_frames(self.embedder, [(f.at, f.image) for f in chosen])

    def _finish(self, finished: list[tuple[int, _Job, Described]], precision: str | None = None
                ) -> list[tuple[int, FileOutcome]]:
        """Write the captions of one model batch into their files, group-committed, and record what each file
        holds afterwards in the index (one transaction). ``precision``: see :meth:`complete`."""
        model_id = self.captioner.model_id
        results: list[tuple[int, FileOutcome]] = []
        writes: list[tuple[int, _Job, Described]] = []
        default = self.config.language.default
        for position, job, said in finished:
            text = said.shown(default)
            path = Path(job.path)
            if not text:
                # Nothing to write or search; recorded as an error so that `status` shows it and --force retries.
                results.append((position, self._fail(job.path, f"{job.path}: the model produced an empty caption",
                                                     job.snap)))
            elif self.dry_run:
                results.append((position, FileOutcome(path, text, model_id,
                                                      skipped=HUMAN_KEPT if job.human_skip else None,
                                                      keywords=said.keywords or (), text=said.text,
                                                      captions=said.all_captions())))
            else:
                if self.hooks.before_write is not None:
                    self.hooks.before_write(path)
                if job.index_only or self.config.metadata.write == "none":
                    results.append((position, self._record_index_only(job, said, _now_iso(self.clock))))
                else:
                    writes.append((position, job, said))
        if not writes:
            return results
        # The precision as the graphs ran (a static int8 image encoder named as such), known now the model has run.
        provenance = Provenance(model=model_id, revision=self.captioner.revision, created_at=_now_iso(self.clock),
                                precision=precision or self.captioner.precision_used)
        requests = [CaptionWrite(Path(job.path), said.shown(default), provenance, job.snap, keywords=said.keywords,
                                 text=said.text, languages=dict(said.captions) if said.captions else None)
                    for _, job, said in writes]
        try:
            landed: Sequence[object] = write_captions(requests, self.config.metadata, force=self.force,
                                                      journal=self.journal, hooks=self.hooks)
        except CapwatchError as exc:  # the journal cannot be written: no file of the batch was touched
            landed = [exc] * len(writes)
        records: list[ImageRecord] = []
        for (position, job, said), result in zip(writes, landed, strict=True):
            path, text = Path(job.path), said.shown(default)
            if isinstance(result, FileChanged):
                results.append((position, FileOutcome(path, text, model_id, skipped=str(result), changed=True)))
            elif isinstance(result, CapwatchError):
                results.append((position, self._fail(job.path, str(result), job.snap)))
            else:
                assert isinstance(result, WriteResult) and result.snapshot is not None  # metadata writing is on
                # What the file holds now, read after the write: ours, or the words of whoever wrote last.
                record = record_from_snapshot(job.path, result.snapshot, job.previous, self.config)
                records.append(_mark_found(replace(record, ocr_text=said.text) if said.text is not None else record,
                                           said))
                results.append((position, FileOutcome(path, text, model_id, written=result.written,
                                                      skipped=result.skipped, keywords=said.keywords or (),
                                                      text=said.text, captions=said.all_captions())))
        if self.index is not None and records:
            self.index.upsert_many(records)
            self._store_vectors([(r.path, r.fingerprint) for r in records])
        return results

    def _store_vectors(self, rows: Sequence[tuple[str, str | None]]) -> None:
        """Store the embeddings made with this batch's captions for the rows just recorded (their fingerprint
        as recorded: what the file holds after the write)."""
        if self.index is None or self.embedder is None or not self._vectors:
            return
        items = [(path, fp, self._vectors[path]) for path, fp in rows if path in self._vectors]
        store_vectors(self.index, self.embedder.model_id, items,
                      {path: self._moments[path] for path, _, _ in items if path in self._moments})

    def _embed_uncaptioned(self, outcomes: Sequence[FileOutcome]) -> None:
        """Embed the files of a batch that were not captioned (a person's description kept, already captioned)
        and have no current vector: every image read gets one. A file that cannot be decoded keeps its row as
        it is (logged)."""
        if self.index is None or self.embedder is None or self.dry_run or not outcomes:
            return
        todo = lacking(self.index, self.embedder.model_id, [o.path for o in outcomes])
        _, failures = embed_paths(self.index, self.embedder, todo, frames=self.frames)
        for path, message in failures:
            log.warning("no embedding: %s", message if message.startswith(path) else f"{path}: {message}")

    def _record_index_only(self, job: _Job, said: Described, now: str) -> FileOutcome:
        """The caption goes to the index only: beside a person's description that stays (``index_only``), or as
        the caption itself when metadata writing is off. Recorded only when the file is still the one that was
        captioned."""
        path, text = Path(job.path), said.shown(self.config.language.default)
        try:
            snap = read_snapshot(path)
        except FileChanged as exc:
            return FileOutcome(path, text, self.captioner.model_id, skipped=str(exc), changed=True)
        except CapwatchError as exc:
            return self._fail(job.path, str(exc), job.snap)
        if not snap.same_as(job.snap):
            return FileOutcome(path, text, self.captioner.model_id, changed=True,
                               skipped=f"{path}: changed while it was being captioned; nothing recorded")
        record = replace(record_from_snapshot(job.path, snap, job.previous, self.config),
                         model=self.captioner.model_id, model_revision=self.captioner.revision, captioned_at=now)
        if job.index_only:
            record = replace(record, model_caption=text)
        else:
            record = replace(record, caption=text, source="model", status="captioned", error=None,
                             captions=said.captions or ())
        if said.keywords is not None:
            # Searchable beside what the file holds, never written into it here.
            record = with_index_only_keywords(record, said.keywords)
        if said.text is not None:
            record = replace(record, ocr_text=said.text)
        record = _mark_found(record, said)
        if self.index is not None:
            self.index.upsert(record)
            self._store_vectors([(record.path, record.fingerprint)])
        return FileOutcome(path, text, self.captioner.model_id,
                           skipped=INDEX_ONLY if job.index_only else WRITING_OFF, keywords=said.keywords or (),
                           text=said.text, captions=said.all_captions())


def _content_identifier(path: Path) -> str | None:
    """A still's Apple content identifier, or None (also when it cannot be read)."""
    try:
        return read_snapshot(path).metadata.content_identifier
    except CapwatchError:
        return None


def recover_writes(logger: logging.Logger) -> None:
    """Settle the writes a killed capwatch left in this user's write journal (every writing command starts
    with this). Logs what was repaired and what had to be left alone; raises nothing."""
    report = Journal.default().recover()
    for message in report.messages:
        logger.warning("%s", message)
    if report.settled:
        logger.info("settled %d interrupted write(s) from the write journal", report.settled)



def _mark_found(record: ImageRecord, said: Described) -> ImageRecord:
    """``record`` marked with what the model and the OCR engine looked for in it (a scan need not fill it in)."""
    found = ([FILLED_TEXT] if said.text is not None else []) + ([FILLED_KEYWORDS] if said.keywords is not None else [])
    return with_filled(record, *found) if found else record


def _moved_on(path: str, state: FileSnapshot | os.stat_result) -> bool:
    """True when ``path`` is no longer the file ``state`` describes (written to, replaced, or gone)."""
    if isinstance(state, FileSnapshot):
        try:
            return not state.identity.matches_stat(os.stat(path))
        except OSError:
            return True
    return moved_on(path, state)


def _same_content(previous: ImageRecord, snap: FileSnapshot) -> bool:
    """True when the row was recorded for exactly this content (and these sidecars)."""
    if previous.fingerprint is None or previous.fingerprint != snap.identity.fingerprint:
        return False
    if previous.size != snap.identity.size:
        return False
    return previous.sidecars is None or previous.sidecars == snap.sidecar_signature
