"""Benchmark: `Image.find_images` for a point (and a small box) among 100,000 images.

Fills a fresh database with N images spread uniformly over the sky (0.1 - 0.6 deg footprints,
random rotations; a core INSERT of dicts), then times point searches at random positions
(half of them at image centres, so that they find something) and 0.5-degree box searches.
Targets: point search <= 50 ms on PostgreSQL (q3c), <= 200 ms on SQLite.

Usage: python bench/bench_find_images.py [--n 100000] [--queries 100] [--sqlite-only]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.base import make_engine, session_scope  # noqa: E402
from models.context import Context, use_context  # noqa: E402
from models.file_store import FileStore  # noqa: E402
from models.image import Image  # noqa: E402
from models.image_queries import _has_q3c  # noqa: E402
from util.config import Config  # noqa: E402
from models.provenance import Provenance  # noqa: E402
from models.schema import upgrade  # noqa: E402
from tests.models.synthetic_files import footprint_rows  # noqa: E402


def _fill(engine: sa.Engine, n: int) -> float:
    prov = Provenance(process="preprocessing", code_version="1.0.0", parameters={"bench": True})
    prov.save()
    rows = footprint_rows(n, np.random.default_rng(1), provenance_id=prov.id)
    start = time.perf_counter()
    with engine.begin() as conn:
        for k in range(0, n, 10000):
            conn.execute(sa.insert(Image.__table__), rows[k:k + 10000])
    elapsed = time.perf_counter() - start
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("ANALYZE"))
    return elapsed


def _queries(n_queries: int) -> list[tuple[float, float]]:
    rng = np.random.default_rng(5)
    ra = rng.uniform(0, 360, n_queries)
    dec = np.degrees(np.arcsin(rng.uniform(-1, 1, n_queries)))
    return list(zip(ra, dec))


def _time(label: str, calls) -> None:
    times, found = [], []
    for call in calls:
        start = time.perf_counter()
        result = call()
        times.append(1000 * (time.perf_counter() - start))
        found.append(len(result))
    times = np.array(times)
    print(f"  {label:<26s} median {statistics.median(times):6.1f} ms   p95 {np.percentile(times, 95):6.1f} ms"
          f"   max {times.max():6.1f} ms   mean found {np.mean(found):.2f}")


def run(url: str, n: int, n_queries: int) -> None:
    engine = make_engine(url)
    upgrade(engine)
    root = tempfile.mkdtemp(prefix="bench-find-images-")
    use_context(Context(config=Config.load(**{"db.url": url, "storage.data_root": root}), engine=engine,
                        store=FileStore(root)))
    print(f"  bulk insert of {n} rows: {_fill(engine, n):.1f} s")
    with session_scope() as session:
        print(f"  q3c in use: {_has_q3c(session)}")
        centres = session.execute(sa.select(Image.ra, Image.dec).limit(n_queries // 2)).all()
    points = [(float(r), float(d)) for r, d in centres] + _queries(n_queries - len(centres))
    Image.find_images(ra=points[0][0], dec=points[0][1])  # warm up caches
    _time("point", [lambda p=p: Image.find_images(ra=p[0], dec=p[1]) for p in points])
    _time("point, filter='r'", [lambda p=p: Image.find_images(ra=p[0], dec=p[1], filter="r") for p in points])
    boxes = [(p[0] - 0.25, p[0] + 0.25, max(p[1] - 0.25, -90), min(p[1] + 0.25, 90)) for p in points]
    _time("box 0.5 deg", [lambda b=b: Image.find_images(minra=b[0] % 360, maxra=b[1] % 360,
                                                        mindec=b[2], maxdec=b[3]) for b in boxes])
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--sqlite-only", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-find-") as tmp:
        print("SQLite:")
        run(f"sqlite:///{Path(tmp) / 'bench.sqlite'}", args.n, args.queries)
    if args.sqlite_only:
        return
    from tests.postgres_cluster import PostgresCluster

    cluster = PostgresCluster()
    cluster.start()
    try:
        admin = make_engine(cluster.url("postgres"))
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("CREATE DATABASE bench"))
        admin.dispose()
        print("PostgreSQL:")
        run(cluster.url("bench"), args.n, args.queries)
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
