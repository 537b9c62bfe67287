"""Reconcile a library root with the index: find new, changed, moved and deleted images by stat alone.

Only files whose size or mtime differ from the index are opened (metadata read for description import, and a
fingerprint). Files that vanished are matched against new files by fingerprint first, so a move or rename keeps
its caption without running the model again. A root that is missing, unmounted or suddenly empty never wipes
its rows: the result says ``root_missing`` (and why, in ``root_problem``), nothing is removed, and the caller
reports it (once: ``scan`` on stderr, the daemon in its log).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from capwatch.config import Config, LibraryConfig, RootConfig
from capwatch.errors import CapwatchError
from capwatch.library.index import ImageRecord, Index, IndexedState, normalise_path
from capwatch.library.livephoto import paired_motion_names
from capwatch.metadata import Description, FileChanged, FileSnapshot, fingerprint_file, is_temp_file, read_snapshot
from capwatch.metadata.formats import is_video_name
from capwatch.metadata.sidecar import EXTENSIONS as SIDECAR_EXTENSIONS
from capwatch.metadata.sidecar import sidecar_names, signature

log = logging.getLogger(__name__)

#: How many rows to write per transaction while scanning (bounded memory, few fsyncs).
_BATCH = 500


@dataclass(frozen=True)
class ReconcileResult:
    root: Path
    seen: int = 0
    unchanged: int = 0
    new: tuple[Path, ...] = ()
    changed: tuple[Path, ...] = ()
    moved: tuple[tuple[str, str], ...] = ()
    removed: tuple[str, ...] = ()
    errors: tuple[tuple[str, str], ...] = ()
    root_missing: bool = False
    #: Why the root was not reconciled ("missing", "empty", "not a directory", "unreadable (...)"), and how many
    #: indexed images below it were kept: what the caller tells the user.
    root_problem: str | None = None
    kept: int = 0
    #: Files whose row is pending after this reconcile: what `scan` (without --no-caption) captions next.
    to_caption: tuple[Path, ...] = ()
    #: Descriptions found in files read now (a person's, or capwatch's in a file new to the index).
    imported: int = field(default=0)
    #: Files read now that hold only camera boilerplate ("OLYMPUS DIGITAL CAMERA"): searchable, still to caption.
    boilerplate: int = 0
    #: Of ``seen``, the videos (by suffix): the summary says "files (N videos)" when there are any.
    videos: int = 0


# -- filters ------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a glob where ``**`` spans folders, ``*`` and ``?`` stay within one name, ``[...]`` is a class.

    Patterns are matched against '/'-separated paths relative to the root; a pattern without a '/' matches
    the file name at any depth (as .gitignore does).
    """
    if "/" not in pattern:
        pattern = "**/" + pattern
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(pattern[i]))
                i += 1
            else:
                body = pattern[i + 1:end]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _matches(relative: str, patterns: tuple[str, ...]) -> bool:
    return any(glob_regex(p).match(relative) for p in patterns)


def _excluded_dir(relative_dir: str, root: RootConfig, library: LibraryConfig) -> bool:
    probe = relative_dir + "/"
    return _matches(probe, library.exclude) or _matches(probe, root.exclude)


def printable_path(path: str | Path) -> str:
    """``path`` safe to print or log: undecodable bytes of a non-UTF-8 file name shown as \\xNN."""
    return os.fspath(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_utf8_path(path: str | Path) -> bool:
    """Whether ``path`` is valid UTF-8 (the index stores text; names from old Latin-1 copies are not)."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _extension_ok(name: str, library: LibraryConfig) -> bool:
    dot = name.rfind(".")
    return dot > 0 and name[dot + 1:].lower() in library.extensions


def is_candidate(path: Path, root: RootConfig, library: LibraryConfig) -> bool:
    """Whether ``path`` (a file somewhere below ``root.path``) is an image capwatch should look after.

    Checks extension, hidden names (unless ``include_hidden``), capwatch's own temp files, and the global and
    per-root include/exclude globs. Does not touch the file system.
    """
    try:
        relative = Path(normalise_path(path)).relative_to(normalise_path(root.path)).as_posix()
    except ValueError:
        return False
    name = relative.rsplit("/", 1)[-1]
    if not is_utf8_path(relative) or is_temp_file(name) or not _extension_ok(name, library):
        return False
    if not library.include_hidden and any(part.startswith(".") for part in relative.split("/")):
        return False
    parts = relative.split("/")
    for depth in range(1, len(parts)):
        if _excluded_dir("/".join(parts[:depth]), root, library):
            return False
    if _matches(relative, library.exclude) or _matches(relative, root.exclude):
        return False
    return not root.include or _matches(relative, root.include)


@lru_cache(maxsize=64)
def _file_patterns(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    """One regex for the file-level globs; patterns ending in '/**' only prune folders and are left out."""
    relevant = [glob_regex(p).pattern for p in patterns if not p.endswith("/**")]
    return re.compile("|".join(f"(?:{r})" for r in relevant)) if relevant else None


#: A candidate image found by :func:`iter_image_files`: (absolute path, stat, digest of its XMP sidecars). A plain
#: tuple: one is made per file on every reconcile of up to millions of files.
FoundFile = tuple[str, os.stat_result, str]


def iter_image_files(root: RootConfig, library: LibraryConfig, *,
                     on_skip: Callable[[str, str], None] | None = None) -> Iterator[FoundFile]:
    """Yield every candidate image below ``root``, depth first.

    Only candidates (and their XMP sidecars) are stat'ed: names, folder types and symlinks come from the
    directory listing itself. Symlinks are skipped unless ``follow_symlinks``; then every folder is visited once,
    by (device, inode), so a link loop (``self -> .``) or two links to one folder index nothing twice. A folder
    or file that cannot be read is reported to ``on_skip(path, message)`` (and logged at debug level).
    """
    base = normalise_path(root.path)
    follow = library.follow_symlinks
    hidden_ok = library.include_hidden
    extensions = frozenset(library.extensions)
    excludes = _file_patterns(library.exclude + root.exclude)
    includes = _file_patterns(root.include) if root.include else None
    seen_dirs: set[tuple[int, int]] = set()
    if follow:
        try:
            st_root = os.stat(base)
            seen_dirs.add((st_root.st_dev, st_root.st_ino))
        except OSError:
            pass
    stack = [(base, "")]

    def skip(path: str, message: str) -> None:
        log.debug("skipping %s", message)
        if on_skip is not None:
            on_skip(path, message)

    while stack:
        directory, relative_dir = stack.pop()
        try:
            with os.scandir(directory) as listing:
                entries = list(listing)
        except OSError as exc:
            shown = printable_path(directory)
            skip(shown, f"{shown}: cannot list this folder: {exc.strerror or exc}")
            continue
        sidecar_entries = {e.name: e for e in entries if e.name.endswith(SIDECAR_EXTENSIONS)}
        # The motion half of a Live Photo is the still's: not an asset of its own (capwatch.library.livephoto).
        motions = paired_motion_names([e.name for e in entries], extensions)
        prefix = relative_dir + "/" if relative_dir else ""
        for entry in entries:
            name = entry.name
            if motions and name in motions:
                continue
            if not hidden_ok and name[0] == ".":
                continue
            if not name.isascii() and not is_utf8_path(name):
                shown = printable_path(entry.path)
                skip(shown, f"{shown}: the name is not valid UTF-8; rename it to have it indexed")
                continue
            try:
                link = entry.is_symlink()
                if link:
                    if not follow:
                        continue
                    is_dir = entry.is_dir()
                else:
                    is_dir = entry.is_dir(follow_symlinks=False)
                if is_dir:
                    relative = prefix + name
                    if _excluded_dir(relative, root, library):
                        continue
                    if follow:
                        st = entry.stat()
                        key = (st.st_dev, st.st_ino)
                        if key in seen_dirs:
                            continue
                        seen_dirs.add(key)
                    stack.append((entry.path, relative))
                    continue
                dot = name.rfind(".")
                if dot <= 0 or name[dot + 1:].lower() not in extensions:
                    continue
                if excludes is not None or includes is not None:
                    relative = prefix + name
                    if excludes is not None and excludes.match(relative):
                        continue
                    if includes is not None and not includes.match(relative):
                        continue
                if name[0] == "." and is_temp_file(name):
                    continue
                st = entry.stat()
                if link:
                    sidecars = sidecar_digest(Path(entry.path))  # the target's sidecars, as the reader sees them
                elif sidecar_entries:
                    sidecars = _sidecar_digest(name, sidecar_entries)
                else:
                    sidecars = ""
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ELOOP):
                    continue  # vanished, or a dangling/looping link: nothing to index
                shown = printable_path(entry.path)
                skip(shown, f"{shown}: {exc.strerror or exc}")
                continue
            if stat.S_ISREG(st.st_mode):
                yield entry.path, st, sidecars


def _sidecar_digest(name: str, entries: dict[str, os.DirEntry[str]]) -> str:
    """The sidecar digest of image ``name`` from its folder's listing (same rule as the reader's)."""
    found = sidecar_names(name, lambda n: n in entries and entries[n].is_file())
    items = []
    for sidecar in found:
        st = entries[sidecar].stat()
        items.append((sidecar, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return signature(items)


# -- records ------------------------------------------------------------------------------------------------------


def with_index_only_keywords(record: ImageRecord, model_keywords: tuple[str, ...]) -> ImageRecord:
    """``record`` with the model's keywords of a file they are not written into (its description stays a
    person's): searchable beside the file's own, those the file already has (in any letter case) not repeated."""
    have = {k.casefold() for k in record.keywords}
    mine = tuple(k for k in model_keywords if k.casefold() not in have)
    return replace(record, keywords=record.keywords + mine, model_keywords=model_keywords)


#: What a row's ``filled`` marks: the text in the image was looked for; the model's keywords were looked for.
FILLED_TEXT = "text"
FILLED_KEYWORDS = "keywords"


def with_filled(record: ImageRecord, *what: str) -> ImageRecord:
    """``record`` marked as having had ``what`` looked for (found or not)."""
    return replace(record, filled=tuple(sorted({*record.filled, *what})))


def _carry_filled(record: ImageRecord, previous: ImageRecord | None) -> ImageRecord:
    """``record`` (just read from its file) keeping the marks of ``previous`` whose results it kept: the text when
    the text is the same, the keywords when capwatch's keywords are."""
    if previous is None or not previous.filled:
        return record
    kept = [what for what in previous.filled
            if (what == FILLED_TEXT and record.ocr_text == previous.ocr_text)
            or (what == FILLED_KEYWORDS and record.model_keywords == previous.model_keywords)
            or what not in (FILLED_TEXT, FILLED_KEYWORDS)]
    return with_filled(record, *kept) if kept else record


def record_from_snapshot(path: str, snap: FileSnapshot, previous: ImageRecord | None,
                         config: Config) -> ImageRecord:
    """Build the index row for a file just read, importing any description found in it (see
    :func:`_record_from_snapshot`); what was looked for in it before is kept where its result was kept."""
    return _carry_filled(_record_from_snapshot(path, snap, previous, config), previous)


def _record_from_snapshot(path: str, snap: FileSnapshot, previous: ImageRecord | None,
                          config: Config) -> ImageRecord:
    """Build the index row for a file just read, importing any description found in it.

    A description with capwatch provenance becomes a ``model`` caption; a person's one ``human`` (the file is
    then ``described`` and, by default, never captioned; a model caption kept for the index only stays);
    camera boilerplate is kept as ``embedded`` but the file stays ``pending``. When the file has none, a model
    caption that lives only in the index (write = none) is kept; anything else becomes ``pending``.

    Keywords are the file's (a person's, and capwatch's as its provenance says); text found in the image is the
    file's capwatch:Text, else what the index held (it is written into files only with ``write_text``).
    """
    meta = snap.metadata
    identity = snap.identity
    base = ImageRecord(
        path=path, size=identity.size, mtime_ns=identity.mtime_ns, ctime_ns=identity.ctime_ns,
        sidecars=snap.sidecar_signature, fingerprint=identity.fingerprint,
        width=meta.width, height=meta.height, taken_at=meta.taken_at,
        keywords=meta.keywords, model_keywords=meta.model_keywords,
        ocr_text=meta.ocr_text if meta.ocr_text is not None or previous is None else previous.ocr_text,
        captions=meta.captions,
    )
    desc: Description | None = meta.description
    if desc is not None and desc.kind == "ours":
        prov = desc.provenance
        return replace(base, caption=desc.text, source="model", status="captioned",
                       model=prov.model if prov else None, model_revision=prov.revision if prov else None,
                       captioned_at=prov.created_at if prov else None)
    if desc is not None and desc.kind == "human":
        # The index holds one caption per file and a person's words win over ours.
        kept = previous if previous is not None and previous.model_caption else None
        if kept is not None and kept.model_keywords and not meta.model_keywords:
            # The model's keywords of a file whose description stays a person's live in the index only.
            base = with_index_only_keywords(base, kept.model_keywords)
        return replace(base, caption=desc.text, source="human", status="described",
                       model_caption=kept.model_caption if kept else None, model=kept.model if kept else None,
                       model_revision=kept.model_revision if kept else None,
                       captioned_at=kept.captioned_at if kept else None)
    if desc is not None and desc.kind == "boilerplate":
        return replace(base, caption=desc.text, source="embedded", status="pending")
    if (previous is not None and previous.source == "model" and previous.caption
            and config.metadata.write == "none"):
        return replace(base, caption=previous.caption, source="model", status="captioned",
                       model=previous.model, model_revision=previous.model_revision,
                       captioned_at=previous.captioned_at, keywords=previous.keywords,
                       model_keywords=previous.model_keywords, captions=previous.captions)
    return base


def read_record(path: str, st: os.stat_result, previous: ImageRecord | None, config: Config) -> ImageRecord:
    """Read one file (and its sidecars) into a row; unreadable files become ``error`` rows, files that keep
    changing while being read (or changed since ``st`` was taken) ``pending`` ones (read again once they settle)."""
    try:
        snap = read_snapshot(Path(path))
    except FileChanged:
        return ImageRecord(path=path, size=st.st_size, mtime_ns=st.st_mtime_ns)
    except CapwatchError as exc:
        if moved_on(path, st):
            # It failed on content that is gone (a file written in two pieces, read between them): not an error.
            return ImageRecord(path=path, size=st.st_size, mtime_ns=st.st_mtime_ns)
        return ImageRecord(path=path, size=st.st_size, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns,
                           status="error", error=str(exc))
    return record_from_snapshot(path, snap, previous, config)


def moved_on(path: str, st: os.stat_result) -> bool:
    """True when ``path`` is no longer the file ``st`` describes (written to, replaced, or gone)."""
    try:
        now = os.stat(path)
    except OSError:
        return True
    return (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns, now.st_ctime_ns) != (
        st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


# -- reconcile ------------------------------------------------------------------------------------------------------


def _root_state(root: Path) -> str | None:
    """Why a root cannot be trusted right now, or None when it looks like a live folder."""
    try:
        st = os.stat(root)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    try:
        with os.scandir(root) as entries:
            if next(entries, None) is None:
                return "empty"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    return None


def reconcile(root: RootConfig, config: Config, index: Index, *,
              progress: Callable[[int], None] | None = None) -> ReconcileResult:
    """Bring the index in line with the files below ``root`` and return what changed.

    A root that is missing, unreadable, not a folder, or empty while the index has images below it is left alone:
    the result has ``root_missing`` and ``root_problem`` set, and nothing is logged (the caller reports it). Never
    raises for a single file (unreadable files become error rows). Raises IndexUnavailable when the index cannot
    be written.
    """
    base = Path(normalise_path(root.path))
    known = index.stat_map(base)
    problem = _root_state(base)
    if problem is not None and (known or problem != "empty"):
        return ReconcileResult(root=base, root_missing=True, root_problem=problem, kept=len(known))

    seen = 0
    videos = 0
    unchanged = 0
    fresh: list[tuple[str, os.stat_result]] = []
    changed: list[tuple[str, os.stat_result]] = []
    missing = dict(known)  # what is left after the walk has vanished from disk
    pop = missing.pop
    skipped: list[tuple[str, str]] = []
    fill: list[tuple[str, int, str]] = []
    for path, st, sidecars in iter_image_files(root, config.library, on_skip=lambda p, m: skipped.append((p, m))):
        seen += 1
        videos += is_video_name(path)
        old = pop(path, None)
        if old is None:
            fresh.append((path, st))
        elif old.differs(st.st_size, st.st_mtime_ns, st.st_ctime_ns, sidecars):
            changed.append((path, st))
        else:
            unchanged += 1
            if not old.complete:
                fill.append((path, st.st_ctime_ns, sidecars))  # a row from before schema 4
        if progress is not None and not seen & 1023:
            progress(seen)
    if progress is not None:
        progress(seen)
    if fill:
        index.fill_state_many(fill)

    gone = list(missing)
    gone_by_fingerprint: dict[str, str] = {}
    for path in gone:
        record = index.get(path)
        if record is not None and record.fingerprint:
            gone_by_fingerprint.setdefault(record.fingerprint, path)

    moved: list[tuple[str, str]] = []
    errors: list[tuple[str, str]] = list(skipped)
    new_paths: list[Path] = []
    pending_rows: list[ImageRecord] = []
    imported = boilerplate = 0

    def flush() -> None:
        if pending_rows:
            index.upsert_many(pending_rows)
            pending_rows.clear()

    for path, st in fresh + changed:
        previous = index.get(path) if known.get(path) is not None else None
        if previous is None and gone_by_fingerprint:
            try:
                fingerprint = fingerprint_file(path)
            except OSError:
                fingerprint = None
            old_path = gone_by_fingerprint.pop(fingerprint, None) if fingerprint else None
            if old_path is not None:
                # A move/rename: keep the caption, only the path changes.
                index.move(old_path, path)
                sidecars = sidecar_digest(Path(path))
                index.update_stat(path, IndexedState(st.st_size, st.st_mtime_ns, st.st_ctime_ns, sidecars),
                                  fingerprint)
                moved.append((old_path, path))
                continue
        record = read_record(path, st, previous, config)
        if record.status == "error" and record.error:
            errors.append((path, record.error))
        if record.source == "human" or (record.source == "model" and previous is None):
            imported += 1
        elif record.source == "embedded":
            boilerplate += 1  # counted among the files waiting for a caption, not as a description
        if previous is None:
            new_paths.append(Path(path))
        pending_rows.append(record)
        if len(pending_rows) >= _BATCH:
            flush()
    flush()

    removed = [p for p in gone if p not in {old for old, _ in moved}]
    index.remove_many(removed)
    to_caption = tuple(Path(r.path) for r in index.iter_records(base, status="pending"))
    changed_paths = tuple(Path(p) for p, _ in changed)
    return ReconcileResult(
        root=base, seen=seen, unchanged=unchanged, new=tuple(new_paths), changed=changed_paths,
        moved=tuple(moved), removed=tuple(removed), errors=tuple(errors), to_caption=to_caption,
        imported=imported, boilerplate=boilerplate, videos=videos,
    )


def _stat_sidecars(path: Path) -> list[tuple[str, int, int, int]]:
    from capwatch.metadata.sidecar import existing_sidecars

    out = []
    for sidecar in existing_sidecars(path):
        try:
            st = os.stat(sidecar)
        except OSError:
            continue
        out.append((sidecar.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return out


def sidecar_digest(path: Path) -> str:
    """The current sidecar digest of the image ``path`` (symlinks resolved, as the reader does; a few stats;
    "" without sidecars)."""
    return signature(_stat_sidecars(Path(os.path.realpath(path))))
