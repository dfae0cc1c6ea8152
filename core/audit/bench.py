"""``python -m core.audit bench``: what the audit log adds to a prediction, and how many
records per second batch logging writes, on a scratch SQLite file and on PostgreSQL.

* **Overhead per prediction**: ``predictor.predict(png)`` alone against ``predict`` followed by
  ``record_prediction`` (hashing the bytes, building the record, committing it), interleaved
  in one process so that load changes hit both alike; reported as the difference of medians
  and, more precisely, as the median of the logging call itself.
* **Batch logging**: records per second when each record is its own transaction (as the CLI
  and the app write them) and when ``write_many`` commits them 100 at a time.

Never touches the deployment's audit database: SQLite runs in a temporary folder, and on
PostgreSQL (``--pg-url``, default ``$CXR_TEST_PG_URL``) everything happens in a scratch
schema that is dropped at the end.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", default=None,
                   help="a run's best.pt (default: a random-init ResNet50 at --img-size)")
    g.add_argument("--img-size", type=int, default=224, help="default %(default)s")
    g = p.add_argument_group("measurement")
    g.add_argument("--repeats", type=int, default=100,
                   help="interleaved predictions with and without logging (default %(default)s)")
    g.add_argument("--records", type=int, default=2000,
                   help="records written for the batch figures (default %(default)s)")
    g.add_argument("--pg-url", default=os.environ.get("CXR_TEST_PG_URL"),
                   help="PostgreSQL to measure too, in a scratch schema (default "
                        "$CXR_TEST_PG_URL; unset: SQLite only)")
    g.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")


def _predictor(args: argparse.Namespace, tmp: Path) -> Any:
    import torch

    from core.config import PreprocessConfig, to_dict
    from core.inference import Predictor
    from core.model import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, build_model, save_checkpoint

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        return Predictor.from_checkpoint(args.checkpoint), args.checkpoint
    torch.manual_seed(0)
    model = build_model(3, weights="none", arch="resnet50")
    path = tmp / "best.pt"
    save_checkpoint({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                     "arch": "resnet50", "classes": ["COVID", "Normal", "Viral Pneumonia"],
                     "preprocess": to_dict(PreprocessConfig(img_size=args.img_size)),
                     "state_dict": model.state_dict()}, path)
    return Predictor.from_checkpoint(path), f"random-init ResNet50 at {args.img_size} px"


def _sample_png() -> bytes:
    import numpy as np
    from PIL import Image

    from core.synthetic import make_phantom

    image, _ = make_phantom("Normal", np.random.default_rng(0), size=512)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def _pg_scratch(url: str) -> tuple[str, Any]:
    """A scratch schema on ``url``: (URL that works in it, drop())."""
    from sqlalchemy import text

    from core.audit import engine as db

    schema = f"cxr_bench_{secrets.token_hex(4)}"
    admin = db.make_engine(url)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))

    def drop() -> None:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()

    sep = "&" if "?" in url else "?"
    return f"{db.normalise_url(url)}{sep}options=-csearch_path%3D{schema}", drop


def _median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values)


def _p95_ms(values: list[float]) -> float:
    s = sorted(values)
    return 1000 * s[min(len(s) - 1, int(0.95 * len(s)))]


def measure(predictor: Any, model: Any, png: bytes, url: str, spool: Path, repeats: int,
            n_records: int) -> dict[str, float]:
    from core.audit.log import AuditLog, AuditStatus, prediction_row, sniff_format

    audit = AuditLog(url, spool_path=spool)
    if not audit.check():
        raise RuntimeError(f"{audit.database}: {audit.health().last_error}")
    session = "bench"
    for _ in range(3):  # warm-up: statement caches, pool, TorchScript
        pred = predictor.predict(png)
        audit.record_prediction(pred, model=model, input=png, source="api", session_id=session)
    plain, logged, logging_only = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        predictor.predict(png)
        plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        pred = predictor.predict(png)
        t1 = time.perf_counter()
        res = audit.record_prediction(pred, model=model, input=png, source="api",
                                      session_id=session)
        t2 = time.perf_counter()
        if res.status is not AuditStatus.WRITTEN:
            raise RuntimeError(f"record not written: {res.message}")
        logged.append(t2 - t0)
        logging_only.append(t2 - t1)
    # batch logging
    fmt = sniff_format(png[:132])
    import hashlib

    digest = hashlib.sha256(png).hexdigest()
    t0 = time.perf_counter()
    for _ in range(n_records):
        audit.write(prediction_row(pred, model=model, input_sha256=digest, input_format=fmt,
                                   source="api", session_id=session))
    single_rate = n_records / (time.perf_counter() - t0)
    rows = [prediction_row(pred, model=model, input_sha256=digest, input_format=fmt,
                           source="api", session_id=session) for _ in range(n_records)]
    t0 = time.perf_counter()
    for start in range(0, n_records, 100):
        audit.write_many(rows[start : start + 100])
    batch_rate = n_records / (time.perf_counter() - t0)
    audit.close()
    return {"predict_ms": _median_ms(plain), "predict_logged_ms": _median_ms(logged),
            "difference_ms": _median_ms(logged) - _median_ms(plain),
            "logging_ms": _median_ms(logging_only), "logging_p95_ms": _p95_ms(logging_only),
            "records_per_s_single": single_rate, "records_per_s_batch100": batch_rate}


def run_bench(args: argparse.Namespace) -> int:
    from core.audit import engine as db
    from core.audit.log import ModelIdentity

    tmp = Path(tempfile.mkdtemp(prefix="cxr-bench-audit-"))
    predictor, origin = _predictor(args, tmp)
    model = ModelIdentity.from_predictor(predictor, run_id="bench")
    png = _sample_png()
    targets: list[tuple[str, str, Any]] = [
        (f"SQLite (WAL, synchronous={db.sqlite_sync().lower()})", f"sqlite:///{tmp / 'audit.db'}",
         None)]
    if args.pg_url:
        url, drop = _pg_scratch(args.pg_url)
        targets.append((f"PostgreSQL ({db.describe(args.pg_url)})", url, drop))
    print(f"Model: {origin}, network {predictor.network}; input: a 512 x 512 PNG phantom "
          f"({len(png) / 1024:.0f} KiB); {args.repeats} interleaved predictions per database")
    header = (f"{'database':<52} {'predict':>9} {'+ log':>9} {'diff':>7} {'log p50':>8} "
              f"{'log p95':>8} {'rec/s 1':>8} {'rec/s 100':>10}")
    print(header)
    failed = False
    for title, url, drop in targets:
        try:
            r = measure(predictor, model, png, url, tmp / "spool.jsonl", args.repeats,
                        args.records)
        except RuntimeError as exc:
            print(f"{title:<52} unavailable: {exc}")
            failed = True
            continue
        finally:
            if drop is not None:
                drop()
        print(f"{title[:52]:<52} {r['predict_ms']:>7.2f}ms {r['predict_logged_ms']:>7.2f}ms "
              f"{r['difference_ms']:>5.2f}ms {r['logging_ms']:>6.2f}ms {r['logging_p95_ms']:>6.2f}ms "
              f"{r['records_per_s_single']:>8.0f} {r['records_per_s_batch100']:>10.0f}")
    print("predict / + log: medians of one prediction without and with its audit record; "
          "diff: their difference; log p50/p95: the logging call alone (hash, record, commit); "
          "rec/s 1: one transaction per record; rec/s 100: write_many, 100 per transaction.")
    return 2 if failed else 0
