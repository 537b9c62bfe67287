"""`capwatch search` and `capwatch status`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from capwatch.config import Config
from capwatch.metadata.formats import is_video_name

if TYPE_CHECKING:
    from capwatch.daemon.textserver import PendingAnswer
    from capwatch.library.index import Index
    from capwatch.library.vectors import Vectors

from capwatch.cli.app import _global_options, _human_bytes, _load, _open_index, cli, log

# -- search -----------------------------------------------------------------------------------------------------

#: Fields whose snippet the text output adds under the caption (a caption hit is the caption line itself).
_SHOWN_FIELDS = {"keywords": "keywords", "text": "text", "path": "path"}


class _SearchCommand(click.Command):
    """Lets ``-word`` (exclude) through as a search word instead of an unknown option.

    Anything that is not one of the command's own options is moved behind ``--``, so ``capwatch search cat -dog``
    and ``capwatch search -dog cat --json`` work as a person expects.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        takes_value: dict[str, bool] = {}
        for param in self.get_params(ctx):
            if isinstance(param, click.Option):
                for name in (*param.opts, *param.secondary_opts):
                    takes_value[name] = not param.is_flag and not param.count
        options: list[str] = []
        words: list[str] = []
        rest = iter(args)
        for arg in rest:
            if arg == "--":
                words.extend(rest)
                break
            name = arg.split("=", 1)[0]
            if name in takes_value:
                options.append(arg)
                if takes_value[name] and "=" not in arg:
                    options.append(next(rest, ""))
            else:
                words.append(arg)
        return super().parse_args(ctx, [*options, "--", *words])


@cli.command(cls=_SearchCommand)
@_global_options
@click.argument("words", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per line: path, caption, score, source, model, taken_at, date and date_from "
              "(the date --since/--until/--sort date use: taken, else the file's time), field (where it matched: "
              "caption, keywords, text, path) and snippet (hits in [brackets]).")
@click.option("--paths", "paths_only", is_flag=True, help="Only the paths, one per line.")
@click.option("-0", "--null", "null_sep", is_flag=True, help="With --paths: separate paths by NUL (for xargs -0).")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="At most N results.")
@click.option("--in", "in_dir", metavar="DIR", type=click.Path(file_okay=False, path_type=Path),
              help="Only images below DIR.")
@click.option("--since", metavar="DATE", help="Taken on or after DATE (YYYY, YYYY-MM, YYYY-MM-DD, 30d, today).")
@click.option("--until", metavar="DATE", help="Taken on or before DATE (the whole day/month/year named).")
@click.option("--source", type=click.Choice(["human", "model", "embedded"]),
              help="Only captions written by people, by the model, or found in the file as camera boilerplate.")
@click.option("--sort", type=click.Choice(["score", "date"]), default="score", show_default=True,
              help="Best match first, or newest (date taken) first.")
@click.option("--by", type=click.Choice(["words", "meaning", "both"]), default="both", show_default=True,
              help="Match the words, the meaning (image embeddings: puppy finds a dog on a couch), or both in one "
              "ranked list.")
@click.pass_context
def search(ctx: click.Context, words: tuple[str, ...], as_json: bool, paths_only: bool, null_sep: bool, limit: int,
           in_dir: Path | None, since: str | None, until: str | None, source: str | None, sort: str,
           by: str) -> None:
    """Find images whose caption, keywords, text in the image or path match WORDS, or whose picture means them.

    \b
    Words are ANDed and match any word form (puppies finds puppy).
    "a phrase" matches exactly these words in order.  -word excludes.
    OR between two words means either.  bik* matches words starting with bik.
    kw:WORD keywords, caption:WORD caption, text:WORD text in the image
    (3+ characters match inside words: text:B12 finds AB1234), path:WORD path.
    CJK matches inside text: 桜 finds 日本の桜.
    Dates use the date taken (EXIF), or the file's time when the camera gave none.
    By meaning: plain words are also compared with the pictures themselves
    (--by both, the default, ranks both kinds of hit in one list; every
    filter and field term applies to them; a hit no word matched is shown
    "by meaning"; a video is found once, at the moment that matched best:
    "at m:ss", "at" in seconds with --json).

    \b
    Examples:
      capwatch search red bike leaning on a wall
      capwatch search '"golden retriever"' beach -snow
      capwatch search bike OR bicycle --since 2023 --in ~/Pictures/2023
      capwatch search kw:dog 'text:"exit 12"' --sort date
      capwatch search --paths -0 sunset | xargs -0 ls -l
      capwatch search puppy on a couch --by meaning
    """
    from capwatch.errors import QueryError
    from capwatch.library.query import make_filters, meaning_text, parse_query

    if as_json and paths_only:
        raise click.UsageError("--json and --paths cannot be used together")
    if null_sep and not paths_only:
        raise click.UsageError("-0 only goes with --paths")
    config = _load(ctx)
    query = parse_query(list(words))
    filters = make_filters(in_dir=str(in_dir) if in_dir else None, since=since, until=until, source=source)
    text = meaning_text(query) if by != "words" else None
    # A running daemon is asked first, before this process imports the index modules and opens the index: it
    # embeds the query and searches its codes meanwhile (on the other core), and the answer is read when needed.
    pending = _ask_daemon(config, text)
    try:
        from capwatch.library.livephoto import motion_of, recorded_motions
        from capwatch.library.meaning import search as find

        styled = sys.stdout.isatty() and not as_json and not paths_only
        # JSON snippets carry the hits in [brackets]; a terminal shows them bold; plain text and --paths unmarked.
        marks = ("\x1b[1m", "\x1b[22m") if styled else ("[", "]") if as_json else ("", "")
        with _open_index(config, readonly=True) as index:
            vector, vectors = None, None
            if by != "words":
                vector, why, vectors = _query_vector(config, index, text, pending)
                if vector is None and by == "meaning":
                    raise QueryError(f"--by meaning: {why}")
                if vector is None:
                    log.debug("searching by words only: %s", why)
            hits = find(index, query, filters, by=by, vector=vector, limit=limit,  # type: ignore[arg-type]
                        highlight=marks, sort="date" if sort == "date" else "score", vectors=vectors)
            # A Live Photo's motion: beside the still by name, else as recorded by content identifier (renamed
            # apart).
            motions = {h.path: motion_of(h.path) for h in hits}
            motions.update(recorded_motions(index, [p for p, m in motions.items() if m is None]))
    finally:
        if pending is not None:
            pending.close()
    from capwatch.library.moments import clock

    out = sys.stdout
    for hit in hits:
        motion = motions.get(hit.path)
        if as_json:
            out.write(json.dumps({"path": hit.path, "caption": hit.caption, "score": round(hit.score, 6),
                                  "source": hit.source, "model": hit.model, "taken_at": hit.taken_at,
                                  "date": hit.date, "date_from": hit.date_from,
                                  "field": hit.field, "snippet": hit.snippet,
                                  "similarity": None if hit.similarity is None else round(hit.similarity, 6),
                                  "match": hit.match,
                                  "media": "video" if is_video_name(hit.path) else "image",
                                  # A Live Photo's motion, one asset with the still (None for everything else).
                                  "pair": str(motion) if motion is not None else None,
                                  # A video found by meaning: the moment (seconds) that matched best.
                                  "at": None if hit.at is None else round(hit.at, 3)},
                                 ensure_ascii=False) + "\n")
        elif paths_only:
            out.write(hit.path + ("\0" if null_sep else "\n"))
        else:
            kind = "  (video)" if is_video_name(hit.path) else f"  (Live Photo with {motion.name})" if motion else ""
            # A file without a caption yet (matched by its path, keywords or text) gets no empty line.
            out.write(f"{hit.path}{kind}\n    {hit.highlighted or hit.caption or '(no caption yet)'}\n")
            # A video found by meaning: where in it (the moment that matched best).
            moment = f" at {clock(hit.at)}" if hit.at is not None else ""
            if hit.match == "meaning":
                out.write(f"    by meaning (similarity {hit.similarity or 0.0:.3f}){moment}\n")
                continue
            if moment:
                out.write(f"   {moment} (by meaning)\n")
            if hit.field in _SHOWN_FIELDS:
                # Matched outside the caption: say where, with the hit marked.
                out.write(f"    {_SHOWN_FIELDS[hit.field]}: {hit.snippet}\n")
    if not hits and in_dir is not None and not os.path.isdir(in_dir):
        # Rows below a folder that is gone (an unmounted root) are still searched; a typo finds nothing.
        raise QueryError(f"--in {in_dir}: that folder does not exist (and nothing indexed below it matches)")
    if not hits and not as_json and not paths_only:
        click.echo("no matches", err=True)


#: Nearest images asked of a running daemon (which holds the codes in memory): twice the fusion depth, enough
#: for a page of results after light filters; when too few pass, this process searches itself. (1000 made the
#: daemon read the exact vectors of 6000 candidates per query.)
DAEMON_NEAREST = 100


def _ask_daemon(config: Config, text: str | None) -> PendingAnswer | None:
    """The question about ``text`` sent to a running daemon (capwatch.daemon.textserver), its answer not read
    yet; None when there is nothing to ask (no plain words, search by meaning off) or no daemon listens."""
    if not text or config.embed.off:
        return None
    from capwatch.daemon.textserver import send

    return send(config.index_path(), text, nearest=DAEMON_NEAREST)


def _query_vector(config: Config, index: Index, text: str | None,
                  pending: PendingAnswer | None = None) -> tuple[Any, str, Vectors | None]:
    """The query's text embedding (from the daemon's ``pending`` answer, else the configured model loaded here),
    or None and why not; and, when this process will compare vectors itself, the index's vectors with their codes
    being read already."""
    from capwatch.library.meaning import NO_PLAIN_WORDS

    if not text:
        return None, NO_PLAIN_WORDS, None
    if config.embed.off:
        return None, 'search by meaning is off ([embed] model = "off")', None
    if index.embedded_count() == 0:
        return None, "no image in the index has an embedding yet; `capwatch scan` fills them in", None
    answer = pending.receive() if pending is not None else None
    if answer is not None:
        from capwatch.library.meaning import QueryVector

        model, vector, nearest, moments = answer
        if index.embedded_count(model):
            log.debug("the query's text embedding came from the running daemon (%s)", model)
            complete = nearest is not None and len(nearest) < DAEMON_NEAREST
            return QueryVector(model, vector, nearest, complete, moments), "", None
    # Imported only now: the model layer costs a word search nothing, and an answer from a running daemon
    # needs neither it nor numpy (150 ms to import on a busy 2-core box).
    from capwatch.library.embed import query_embedder, query_vector
    from capwatch.library.vectors import Vectors

    embedder, why = query_embedder(config, load_text=True)
    if embedder is None:
        return None, why, None
    from capwatch.library import codesfile

    # The codes (64 MB at a million images) are mapped from the file the last search here kept in the cache, or,
    # when the index changed since, read on another thread while the text model loads and embeds the query here
    # (on two cores the search then waits for the longer of the two, not for both) and kept for the next.
    vectors = Vectors(index, codes_dir=codesfile.kept_directory())
    vectors.read_ahead(embedder.model_id)
    try:
        found, why = query_vector(index, embedder, text)
        return found, why, vectors
    finally:
        embedder.close()


# -- status -----------------------------------------------------------------------------------------------------


def _model_label(config: Config) -> str:
    return str(config.model.dir) if config.model.dir is not None else config.model.name


def _running_model(live: dict[str, Any], configured: str) -> str:
    """The model line of `status` while a daemon runs: the model it runs (id, revision, precision), not ours."""
    label = str(live.get("model") or configured)
    model_id, revision, precision = live.get("model_id"), live.get("model_revision"), live.get("model_precision")
    details = [str(model_id) + (f" @ {str(revision)[:12]}" if revision else "")] if model_id else []
    if precision:
        details.append(str(precision))
    if live.get("model_provider"):
        details.append(f"on {live['model_provider']}")
    text = f"{label} ({', '.join(details)})" if details else label
    if label != configured:
        override = live.get("model_override")
        if override:
            # A reload applies the daemon's --model (or $CAPWATCH_MODEL) again: it would not switch.
            text += (f"  [this configuration says {configured}, but the daemon was started with the model {override} "
                     "(--model or $CAPWATCH_MODEL), which a reload keeps: restart it without that to switch]")
        else:
            text += f"  [this configuration says {configured}: reload the daemon to switch]"
    return text


def _check_readable(index_path: Path) -> None:
    """Raise IndexUnavailable (one line naming the file or folder) when a permission keeps this user from reading
    the index at ``index_path``, e.g. ``--system status`` outside the service's group. A missing index is fine."""
    from capwatch.library.access import check_readable

    check_readable(index_path)


def _live_state(index_path: Path) -> dict[str, Any] | None:
    from capwatch.daemon.instance import read_live_state

    return read_live_state(index_path)


def _cluster_state(config: Config) -> dict[str, Any]:
    """The configured Dask scheduler and its workers (capwatch.cluster), or why they cannot be seen."""
    try:
        from capwatch.cluster import cluster_state
    except ImportError:
        from capwatch.paths import install_hint

        return {"scheduler": config.cluster.scheduler, "workers": [],
                "error": f"Dask distributed is not installed: {install_hint('cluster')}"}
    assert config.cluster.scheduler is not None
    return cluster_state(config.cluster.scheduler, timeout=min(5.0, config.cluster.connect_timeout_seconds))


def _echo_cluster(cluster: dict[str, Any]) -> None:
    if cluster.get("error"):
        click.echo(f"cluster    {cluster['scheduler']}: {cluster['error']}")
        return
    workers = cluster.get("workers") or []
    click.echo(f"cluster    {cluster['scheduler']}: {len(workers)} worker(s)")
    for worker in workers:
        model = worker.get("model") or "no capwatch model loaded (yet)"
        click.echo(f"  worker   {worker['address']} ({worker['threads']} threads): {model}")


def _scan_hint(ctx: click.Context) -> str:
    """The command that makes the index `status` looks at: the service's own, run as its user, with --system."""
    app = ctx.obj
    if not getattr(app, "system", False):
        return "capwatch scan DIR"
    import shlex

    from capwatch.daemon.unit import SERVICE_USER, capwatch_command
    from capwatch.errors import CapwatchError

    try:
        command = " ".join(shlex.quote(word) for word in capwatch_command())
    except CapwatchError:
        command = "capwatch"
    return f"sudo -u {SERVICE_USER} {command} --system scan"


@cli.command()
@_global_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show counts by status and source, recent errors, the index and the model (and the daemon, if running)."""
    config = _load(ctx)
    index_path = config.index_path()
    _check_readable(index_path)
    live = _live_state(index_path)
    embedded = 0
    if index_path.exists():
        with _open_index(config, readonly=True) as index:
            stats = index.stats()
        embedded = stats.embedded
        images, captioned, size = stats.images, stats.captioned, stats.size_bytes
        videos, videos_captioned = stats.videos, stats.videos_captioned
        by_status, by_source = stats.by_status, stats.by_source
        errors = [{"path": e.path, "error": e.error, "at": e.updated_at} for e in stats.last_errors]
    else:
        images = captioned = size = videos = videos_captioned = 0
        by_status, by_source, errors = {}, {}, []
    payload = {
        "images": images, "captioned": captioned, "pending": int(by_status.get("pending", 0)),
        "described": int(by_status.get("described", 0)), "errors": int(by_status.get("error", 0)),
        # Of "images": the videos, and how many of them have a caption.
        "videos": videos, "videos_captioned": videos_captioned,
        "by_status": by_status, "by_source": by_source, "last_errors": errors, "embedded": embedded,
        # While a daemon runs, the model is the one it runs (its configuration may not be ours).
        "index": str(index_path), "index_bytes": size,
        "model": str(live.get("model") or _model_label(config)) if live else _model_label(config),
        "model_id": live.get("model_id") if live else None,
        "model_revision": live.get("model_revision") if live else None,
        "model_state": live.get("model_state") if live else None,
        "model_provider": live.get("model_provider") if live else None,
        "daemon": live,
    }
    cluster_info = _cluster_state(config) if config.cluster.scheduler else {}
    if cluster_info:
        payload["cluster"] = cluster_info
    if as_json:
        click.echo(json.dumps(payload, ensure_ascii=False))
        return
    click.echo(f"index      {index_path} ({_human_bytes(size)})" if index_path.exists()
               else f"index      {index_path} (not created yet: run `{_scan_hint(ctx)}`)")
    click.echo(f"model      {_running_model(live, _model_label(config)) if live else payload['model']}")
    click.echo(f"images     {images}" + (f"  (videos {videos}, {videos_captioned} captioned)" if videos else ""))
    click.echo(f"captioned  {captioned}  (model {by_source.get('model', 0)}, human {by_source.get('human', 0)}, "
               f"embedded {by_source.get('embedded', 0)})")
    click.echo(f"embedded   {embedded}  (search by meaning)")
    click.echo(f"pending    {payload['pending']}")
    click.echo(f"errors     {payload['errors']}")
    for entry in errors:
        # Most messages already start with the file's path; do not say it twice.
        message = str(entry["error"])
        click.echo(f"  {message}" if message.startswith(str(entry["path"])) else f"  {entry['path']}: {message}")
    if live:
        click.echo(f"daemon     running since {live.get('started', '?')} (pid {live.get('pid')}), "
                   f"{live.get('state', '')}")
        click.echo(f"  queue    {live.get('queue', 0)} ({live.get('queue_live', 0)} live, "
                   f"{live.get('queue_backfill', 0)} backfill), {live.get('in_flight', 0)} in flight, "
                   f"{live.get('settling', 0)} settling")
        if live.get("backfill_total"):
            click.echo(f"  backfill {live.get('backfill_done', 0)} / {live.get('backfill_total')}")
        click.echo(f"  rate     {float(live.get('rate_per_minute') or 0):.1f} images/min; "
                   f"{live.get('captioned', 0)} captioned, {live.get('errors', 0)} errors since the daemon started")
        state = str(live.get("model_status") or ("loaded" if live.get("model_loaded") else "unloaded"))
        if state.startswith("model ") and not state.startswith("model error"):
            state = state.removeprefix("model ")  # under the label "model": not "model model NAME is not ..."
        click.echo(f"  model    {state}")
        for root in live.get("missing_roots") or []:
            click.echo(f"  missing  {root} (kept in the index; re-checked periodically)")
    else:
        click.echo("daemon     not running")
    if config.cluster.scheduler:
        _echo_cluster(cluster_info)
