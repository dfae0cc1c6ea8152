"""``python -m core.audit``: read, export, purge and migrate the prediction audit log.

Examples::

    python -m core.audit stats
    python -m core.audit export --since 2026-01-01 --until 2026-01-31 --csv january.csv
    python -m core.audit purge --before 2025-12-01          # e.g. nightly from cron
    python -m core.audit replay                             # write the spool into the database
    python -m core.audit bench                              # the overhead of logging

The database is ``CXR_DB_URL`` (default: SQLite in the user's data folder), or ``--db-url``.
Exit status: 0 done; 1 records are outstanding (``replay``: some still spooled or rejected);
2 the database is unavailable or an argument is invalid.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from pathlib import Path

from core.audit import engine as db
from core.audit import query
from core.audit.log import AuditLog, Health, audit_enabled, error_text
from core.errors import CXRError

log = logging.getLogger("core.audit")


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date; write it as YYYY-MM-DD") from None


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("database")
    g.add_argument("--db-url", default=None, metavar="URL",
                   help="SQLAlchemy URL (default: $CXR_DB_URL, else SQLite in the user's data "
                        "folder)")
    g.add_argument("--log-level", default="WARNING",
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    ap = argparse.ArgumentParser(
        prog="python -m core.audit",
        description="The prediction audit log: statistics, CSV export, retention, spool replay, "
                    "schema migrations and a benchmark. Research use only.",
        epilog="Exit status: 0 done; 1 records outstanding (replay); 2 database unavailable or "
               "invalid argument.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("stats", parents=[common], help="counts per class, source and run",
                       description="Totals of the audit log: records, predictions, refusals, "
                                   "per class, source and run, flag shares, records written "
                                   "late or rejected, and what waits in the spool.")
    g = p.add_argument_group("records")
    g.add_argument("--since", type=_date, metavar="DATE", help="first UTC day (YYYY-MM-DD)")
    g.add_argument("--until", type=_date, metavar="DATE", help="last UTC day, included")
    g.add_argument("--run", action="append", default=[], help="only this run (repeatable)")
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = sub.add_parser("export", parents=[common], help="write records to a CSV file",
                       description="Write the records of a UTC date range to CSV, one row per "
                                   "record, one prob_<class> column per class.")
    g = p.add_argument_group("records")
    g.add_argument("--since", type=_date, metavar="DATE", help="first UTC day (YYYY-MM-DD)")
    g.add_argument("--until", type=_date, metavar="DATE", help="last UTC day, included")
    g.add_argument("--run", action="append", default=[], help="only this run (repeatable)")
    g.add_argument("--class", dest="classes", action="append", default=[],
                   help=f"only this predicted class (repeatable; {query.REFUSED!r}: refusals)")
    g = p.add_argument_group("output")
    g.add_argument("--csv", required=True, metavar="FILE", help="CSV file to write")

    p = sub.add_parser("purge", parents=[common], help="delete records older than a date",
                       description="Delete the records (and incidents) made before 00:00 UTC "
                                   "of DATE. Schedule it for retention, e.g. with cron.")
    g = p.add_argument_group("retention")
    g.add_argument("--before", type=_date, required=True, metavar="DATE",
                   help="delete records before this UTC day (YYYY-MM-DD)")
    g.add_argument("--dry-run", action="store_true", help="count only, delete nothing")

    sub.add_parser("replay", parents=[common], help="write spooled records into the database",
                   description="Write the records spooled while the database was unavailable "
                               "(idempotent); report what is still outstanding.")

    p = sub.add_parser("upgrade", parents=[common], help="migrate the schema up",
                       description="Apply the Alembic migrations (the library also does this "
                                   "on first use).")
    g = p.add_argument_group("migration")
    g.add_argument("--revision", default="head", help="target revision (default %(default)s)")
    p = sub.add_parser("downgrade", parents=[common], help="migrate the schema down",
                       description="Undo migrations down to REVISION ('base' drops the audit "
                                   "tables and every record in them).")
    g = p.add_argument_group("migration")
    g.add_argument("revision", help="target revision, e.g. base")
    sub.add_parser("current", parents=[common], help="print the schema revision",
                   description="Print the database's schema revision and this version's head.")

    p = sub.add_parser("bench", parents=[common], help="what logging adds to a prediction",
                       description="Time one prediction with and without its audit record "
                                   "(interleaved, same process) and batch logging, on a "
                                   "scratch SQLite file and, with --pg-url, on PostgreSQL.")
    from core.audit.bench import add_arguments

    add_arguments(p)
    return ap


def _filters(args: argparse.Namespace) -> query.Filters:
    return query.Filters(since=args.since, until=args.until, runs=tuple(args.run),
                         classes=tuple(getattr(args, "classes", ()) or ()))


def _print_stats(s: dict, health: Health, as_json: bool) -> None:
    if as_json:
        print(json.dumps({**s, "spool": {"path": health.spool, "pending": health.pending,
                                         "rejected": health.rejected}}, indent=2))
        return

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    print(f"Database: {health.database}")
    if not health.enabled:
        print("The audit log is OFF in this deployment (CXR_AUDIT=0): no new records are written.")
    print(f"Records: {s['records']} ({s['predictions']} predictions, {s['refusals']} refusals)"
          f", {s['first'] or '-'} to {s['last'] or '-'} (UTC)")
    print(f"Flags among predictions: OOD {pct(s['ood_share'])}, low confidence "
          f"{pct(s['low_confidence_share'])}")
    for title, key in (("Per class", "per_class"), ("Per source", "per_source"),
                       ("Per run", "per_run")):
        print(f"{title}: " + (", ".join(f"{k} {n}" for k, n in s[key].items()) or "none"))
    inc = s["incidents"]
    print(f"Written late from the spool: {inc.get('replayed', 0)}; rejected: "
          f"{inc.get('rejected', 0)}")
    print(f"Spool {health.spool}: {health.pending} waiting, {health.rejected} rejected")


def run(args: argparse.Namespace) -> int:
    url = db.normalise_url(args.db_url) if args.db_url else db.default_url()
    if args.command == "bench":
        from core.audit.bench import run_bench

        return run_bench(args)
    if args.command in ("downgrade", "current") or (args.command == "upgrade"
                                                    and args.revision != "head"):
        engine = db.make_engine(url)
        try:
            if args.command == "current":
                print(f"{db.describe(url)}: revision {db.current_revision(engine) or 'none'} "
                      f"(this version's head: {db.head_revision()})")
            elif args.command == "downgrade":
                db.downgrade(engine, args.revision)
                print(f"Downgraded {db.describe(url)} to {args.revision}")
            else:
                db.upgrade(engine, args.revision)
                print(f"Upgraded {db.describe(url)} to {args.revision}")
        finally:
            engine.dispose()
        return 0
    audit = AuditLog(url, enabled=audit_enabled())
    try:
        engine = audit.engine
        if args.command == "upgrade":
            print(f"{db.describe(url)} is at revision {db.current_revision(engine)} (head)")
        elif args.command == "stats":
            _print_stats(query.stats(engine, _filters(args)), audit.health(), args.json)
        elif args.command == "export":
            out = Path(args.csv)
            out.parent.mkdir(parents=True, exist_ok=True)
            df = query.load_records(engine, _filters(args))
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_bytes(query.to_csv(df))
            tmp.replace(out)
            print(f"Wrote {len(df)} record(s) to {out}")
        elif args.command == "purge":
            n = query.purge(engine, args.before, dry_run=args.dry_run)
            print(f"{'Would delete' if args.dry_run else 'Deleted'} {n} record(s) made before "
                  f"{args.before.isoformat()} 00:00 UTC")
        elif args.command == "replay":
            replayed, rejected = audit.replay()
            health = audit.health()
            print(f"Replayed {replayed} record(s); {rejected} rejected; {health.pending} still "
                  f"in {health.spool}; {health.rejected} rejected in all")
            return 1 if health.pending or health.rejected else 0
    finally:
        audit.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    from sqlalchemy import exc as sa_exc

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.ProgrammingError) as exc:
        log.error("The audit database is unavailable: %s", error_text(exc))
        return 2
    except CXRError as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
