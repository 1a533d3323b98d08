"""Benchmark: saving one 2048 x 4096 image (data + weight + flags) into the file store and database.

Prints, for SQLite (and PostgreSQL with --postgres):

- save: `save_products` of an in-memory `Image` (float32 data and weight, uint16 flags): the
  FITS write, fsync, md5 and the row insert (target <= 0.5 s);
- from_file + save: `Image.from_file` of a single-HDU float32 file (noise-model weight, flags)
  followed by the same save;
- ingest_file: the whole ingestion (exposure copy + image), for reference.

Usage: python bench/bench_ingest.py [--postgres] [--repeat N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.base import make_engine  # noqa: E402
from models.context import Context  # noqa: E402
from models.file_store import FileStore  # noqa: E402
from util.config import Config  # noqa: E402
from models.image import Image, ingest_file, ingest_provenance  # noqa: E402
from models.saving import save_products  # noqa: E402
from models.schema import upgrade  # noqa: E402
from tests.models.synthetic_files import synthetic_header, tan_wcs  # noqa: E402

SHAPE = (4096, 2048)  # (ny, nx): one DECam CCD


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _report(label: str, times: list[float]) -> None:
    print(f"  {label:<22s} median {statistics.median(times):.3f} s   min {min(times):.3f} s   "
          f"max {max(times):.3f} s   (n={len(times)})")


def run(url: str, workdir: Path, repeat: int) -> None:
    engine = make_engine(url)
    upgrade(engine)
    config = Config.load(**{"db.url": url, "storage.data_root": str(workdir / "data")})
    context = Context(config=config, engine=engine, store=FileStore(workdir / "data"))
    prov = ingest_provenance()
    with context.session() as session:
        prov.save(session)
    rng = np.random.default_rng(0)
    data = rng.normal(1000.0, 30.0, SHAPE).astype(np.float32)
    weight = np.full(SHAPE, 1 / 900.0, np.float32)
    flags = np.zeros(SHAPE, np.uint16)
    wcs = tan_wcs(150.0, 2.0, SHAPE, scale_arcsec=0.26)

    def make_image() -> Image:
        return Image(provenance=prov, instrument="Synthetic", filter="r", section_id="N4",
                     mjd=60000.0 + rng.uniform(), end_mjd=60000.5, exp_time=60.0,
                     data=data, weight=weight, flags=flags, wcs=wcs)

    saves = [_timed(lambda: save_products([make_image()], context=context)) for _ in range(repeat)]
    _report("save (in memory)", saves)

    header = synthetic_header()
    header.update(wcs.to_header())
    paths = []
    for k in range(repeat):
        header["MJD-OBS"] = 60000.0 + k
        path = workdir / f"raw_{k}.fits"
        fits.PrimaryHDU(data, header=header).writeto(path, overwrite=True)
        paths.append(path)
    both = []
    for path in paths:
        both.append(_timed(lambda: save_products([Image.from_file(path, provenance=prov)], context=context)))
    _report("from_file + save", both)
    for path in paths:  # new md5s, so every ingestion does the full work
        with fits.open(path, mode="update") as hdul:
            hdul[0].header["OBJECT"] = f"again {path.name}"
    _report("ingest_file", [_timed(lambda: ingest_file(p, context=context)) for p in paths])
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres", action="store_true", help="also run on a throwaway PostgreSQL")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        workdir = Path(tmp)
        print(f"image {SHAPE[0]} x {SHAPE[1]} float32 data + float32 weight + uint16 flags "
              f"({(8 + 2) * SHAPE[0] * SHAPE[1] / 1e6:.0f} MB per file)")
        print("SQLite:")
        run(f"sqlite:///{workdir / 'bench.sqlite'}", workdir / "sqlite", args.repeat)
        if args.postgres:
            import sqlalchemy as sa

            from tests.postgres_cluster import PostgresCluster

            cluster = PostgresCluster()
            cluster.start()
            try:
                admin = make_engine(cluster.url("postgres"))
                with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                    conn.execute(sa.text("CREATE DATABASE bench"))
                admin.dispose()
                print("PostgreSQL:")
                run(cluster.url("bench"), workdir / "pg", args.repeat)
            finally:
                cluster.stop()


if __name__ == "__main__":
    main()
