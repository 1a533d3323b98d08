"""The ``seechange`` command line.

::

    seechange db upgrade                      # create or migrate the schema
    seechange ingest FILE... [--instrument N] # exposures and images into the database
    seechange images [--ra --dec --filter]    # find images
    seechange run [IMAGE_OR_EXPOSURE_ID...]   # the pipeline, then tag the provenances
    seechange provenance list | tag TAG       # provenances and tags
    seechange demo                            # synthetic images through the pipeline

Every command takes ``--config FILE`` (else ``$SEECHANGE_CONFIG``) and ``--help``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]

log = logging.getLogger("seechange")


def _setup(args: argparse.Namespace):
    from models.base import use_database
    from models.file_store import use_file_store
    from models.schema import upgrade
    from util.config import Config

    config = Config.load(args.config)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = use_database(config)
    use_file_store(config)
    if getattr(args, "command", None) != "db":
        upgrade(engine)
    return config


def _cmd_db(args: argparse.Namespace) -> int:
    from models.base import current_engine
    from models.schema import current_revision, upgrade

    _setup(args)
    engine = current_engine()
    upgrade(engine)
    print(f"database {engine.url.render_as_string(hide_password=True)} at revision "
          f"{current_revision(engine)}")
    return 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    from models.image import ingest_file

    _setup(args)
    for path in args.files:
        exposure, images = ingest_file(path, instrument=args.instrument)
        print(f"{path}: exposure {exposure.id} ({exposure.instrument}, {exposure.filter}, "
              f"{exposure.exp_time:g} s), {len(images)} image(s)")
        for image in images:
            print(f"  image {image.id} section {image.section_id}")
    return 0


def _print_images(images) -> None:
    print(f"{'id':36}  {'instrument':10} {'section':7} {'filter':8} {'mjd':>11} {'ra':>9} {'dec':>9}")
    for im in images:
        print(f"{str(im.id):36}  {im.instrument:10} {str(im.section_id):7} {str(im.filter):8} "
              f"{im.mjd:11.5f} {im.ra:9.4f} {im.dec:9.4f}")


def _cmd_images(args: argparse.Namespace) -> int:
    from models.image import Image
    from models.provenance import ProvenanceTag

    _setup(args)
    prov_ids = None
    if args.tag:
        prov_ids = [p.id for p in ProvenanceTag.provenances(args.tag).values()]
    images = Image.find_images(provenance_ids=prov_ids, ra=args.ra, dec=args.dec, filter=args.filter,
                               instrument=args.instrument, order_by=args.order_by,
                               max_number=args.max_number)
    _print_images(images)
    print(f"{len(images)} image(s)")
    return 0


def _cmd_provenance(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from models.base import session_scope
    from models.provenance import Provenance, ProvenanceTag
    from pipeline.data_store import DataStore
    config = _setup(args)
    if args.action == "list":
        with session_scope() as session:
            provs = session.scalars(select(Provenance).order_by(Provenance.process)).all()
        tags = {}
        for tag in ProvenanceTag.tags():
            for process, prov in ProvenanceTag.provenances(tag).items():
                tags.setdefault(prov.id, []).append(tag)
        for prov in provs:
            print(f"{prov.id}  {prov.process:14} v{prov.code_version:8} tags: "
                  f"{','.join(tags.get(prov.id, [])) or '-'}  {prov.parameters}")
        return 0
    # tag: the provenances the configuration gives for every image's tree
    from models.image import Image
    with session_scope() as session:
        roots = {im.provenance_id: im for im in session.scalars(select(Image)).all()}
    provs: dict[str, Provenance] = {}
    for image in roots.values():
        tree = DataStore(image).make_prov_tree(config)
        provs.update({p.id: p for p in tree.values()})
    ProvenanceTag.add(args.tag, provs.values())
    print(f"tagged {len(provs)} provenance(s) as '{args.tag}'")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.runner import run_all

    config = _setup(args)
    run_all(config, ids=args.ids, tag=args.tag)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    run_demo(config_path=args.config, n_images=args.n_images, size=args.size, verbose=args.verbose)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``seechange`` command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="user config file (else $SEECHANGE_CONFIG)")
    common.add_argument("-v", "--verbose", action="store_true", help="log progress")

    parser = argparse.ArgumentParser(prog="seechange", parents=[common],
                                     description="SeeChange: find what changed on the sky.")
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", parents=[common], help="database schema")
    db.add_argument("action", choices=["upgrade"], help="upgrade: apply all migrations")
    db.set_defaults(func=_cmd_db)

    ingest = sub.add_parser("ingest", parents=[common], help="ingest FITS files")
    ingest.add_argument("files", nargs="+", metavar="FILE")
    ingest.add_argument("--instrument", metavar="NAME", help="instrument (default: from the header)")
    ingest.set_defaults(func=_cmd_ingest)

    images = sub.add_parser("images", parents=[common], help="list or find images")
    images.add_argument("--ra", type=float, help="RA (deg) that the image must contain")
    images.add_argument("--dec", type=float, help="Dec (deg) that the image must contain")
    images.add_argument("--filter")
    images.add_argument("--instrument")
    images.add_argument("--tag", help="only images whose provenance is in this tag")
    images.add_argument("--order-by", default="earliest", choices=["earliest", "latest", "quality"])
    images.add_argument("--max-number", type=int)
    images.set_defaults(func=_cmd_images)

    run = sub.add_parser("run", parents=[common], help="run the pipeline on images or exposures")
    run.add_argument("ids", nargs="*", help="image or exposure ids (default: every exposure and image)")
    run.add_argument("--tag", help="tag the provenances used with this name")
    run.set_defaults(func=_cmd_run)

    prov = sub.add_parser("provenance", parents=[common], help="provenances and tags")
    prov_sub = prov.add_subparsers(dest="action", required=True)
    prov_sub.add_parser("list", parents=[common], help="list provenances and their tags")
    tag = prov_sub.add_parser("tag", parents=[common],
                              help="tag the configured provenance tree of every image")
    tag.add_argument("tag", metavar="TAG")
    prov.set_defaults(func=_cmd_provenance)

    demo = sub.add_parser("demo", parents=[common], help="simulate images and run the pipeline")
    demo.add_argument("--n-images", type=int, default=3)
    demo.add_argument("--size", type=int, default=1024, help="image size in pixels (square)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``seechange`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:  # one clear line for the user; --verbose shows the traceback
        if getattr(args, "verbose", False):
            raise
        print(f"seechange {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
