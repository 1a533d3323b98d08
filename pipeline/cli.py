"""The ``seechange`` command line.

::

    seechange db upgrade                      # create or migrate the schema
    seechange db check [--quick] [--min-age S] # rows without files, orphan files, md5s, temp files
    seechange db clean [--dry-run]            # remove those, so that a re-run remakes what is gone
    seechange ingest FILE... [--instrument N] [--weight W --flags F]
    seechange images [--ra --dec --filter]    # find images
    seechange make-ref --ra RA --dec DEC --filter F [--start-mjd --end-mjd --max-seeing --images ID...]
    seechange run [IMAGE_OR_EXPOSURE_ID...]   # the pipeline, then tag the provenances [--verify]
    seechange provenance list | tag TAG       # provenances and tags
    seechange demo                            # synthetic images through the pipeline

Every command takes ``--config FILE`` (else ``$SEECHANGE_CONFIG``), ``-v`` and ``--help``, before
or after the command's name.  The command line is an entry point: it reads the configuration,
makes the `models.context.Context` every command works in, and sets sep's pixel buffer from
``pipeline.sep_pixel_stack`` (a process-wide setting of sep, so only a program's entry point
may choose it).

Errors are reported once, on one line (`pipeline.runner.error_line`: no traceback, no SQL);
``-v`` shows the log and the traceback.  SIGTERM (a pre-empted worker) stops the command as
Ctrl-C does: the save in progress is rolled back and its files removed.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence

__all__ = ["main", "build_parser"]

log = logging.getLogger("seechange")


def _setup(args: argparse.Namespace, *, migrate: bool = True):
    import sep

    from models.context import Context, use_context
    from models.schema import upgrade
    from util.config import Config, ConfigError

    root = logging.getLogger()
    configured = bool(root.handlers)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose and not configured:
        root.handlers[0].addFilter(_warnings_only)
    context = use_context(Context.from_config(Config.load(args.config)))
    pixel_stack = context.config.get("pipeline.sep_pixel_stack")
    if isinstance(pixel_stack, bool) or not isinstance(pixel_stack, int) or pixel_stack <= 0:
        raise ConfigError(f"pipeline.sep_pixel_stack must be a positive integer, got {pixel_stack!r}")
    sep.set_extract_pixstack(pixel_stack)
    if migrate:
        upgrade(context.engine)
    return context


def _warnings_only(record: logging.LogRecord) -> bool:
    """Without -v, errors are not logged: the command reports each one itself, on one line."""
    return record.levelno < logging.ERROR


def _cmd_db(args: argparse.Namespace) -> int:
    from models import maintenance
    from models.schema import current_revision, upgrade

    context = _setup(args, migrate=False)
    upgrade(context.engine)
    where = (f"database {context.engine.url.render_as_string(hide_password=True)}, "
             f"data root {context.store.root}")
    if args.action == "upgrade":
        print(f"database {context.engine.url.render_as_string(hide_password=True)} at revision "
              f"{current_revision(context.engine)}")
        return 0
    if args.action == "check":
        report = maintenance.check(context, md5=not args.quick, min_age=args.min_age)
        print(where)
        for problem in report.problems:
            print(problem.line())
        print(report.summary())
        return 0 if report.ok else 1
    report = maintenance.clean(context, dry_run=args.dry_run, md5=not args.quick, min_age=args.min_age)
    print(where)
    for action in report.actions:
        print(action)
    print(report.summary() + ("; nothing done (--dry-run)" if args.dry_run else
                              f"; {len(report.actions) or 'nothing'} repair(s) done"))
    return 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    from pathlib import Path

    from models.image import ingest_file
    from pipeline.runner import error_line

    context = _setup(args)
    if (args.weight or args.flags) and len(args.files) != 1:
        raise ValueError("--weight and --flags belong to one image: give a single FILE with them")
    failed = 0
    for path in args.files:
        try:
            if Path(path).is_dir():
                raise IsADirectoryError(f"{path} is a directory, not a FITS file")
            exposure, images = ingest_file(path, instrument=args.instrument, weight=args.weight,
                                           flags=args.flags, context=context)
        except Exception as exc:  # a batch goes on past a bad file
            if args.verbose:
                raise
            message = error_line(exc)
            if Path(path).name not in message:
                message = f"{path}: {message}"
            print(f"seechange ingest: error: {message}" if len(args.files) == 1 else
                  f"{path}: error: {message}", file=sys.stderr)
            failed += 1
            continue
        print(f"{path}: exposure {exposure.id} ({exposure.instrument}, {exposure.filter}, "
              f"{exposure.exp_time:g} s), {len(images)} image(s)")
        for image in images:
            print(f"  image {image.id} section {image.section_id}")
    if failed and len(args.files) > 1:
        print(f"{failed} of {len(args.files)} file(s) could not be ingested", file=sys.stderr)
    return 1 if failed else 0


def _cmd_images(args: argparse.Namespace) -> int:
    from models.image import Image

    context = _setup(args)
    with context.session() as session:
        images = Image.find_images(tag=args.tag, ra=args.ra, dec=args.dec, filter=args.filter,
                                   instrument=args.instrument, type=args.type, order_by=args.order_by,
                                   max_number=args.max_number, session=session)
    print(f"{'id':36}  {'type':10} {'instrument':10} {'section':7} {'filter':8} {'mjd':>11} {'ra':>9} {'dec':>9}")
    for im in images:
        kind = getattr(im.type, "value", im.type)
        print(f"{str(im.id):36}  {kind:10} {im.instrument:10} {str(im.section_id):7} {str(im.filter):8} "
              f"{im.mjd:11.5f} {im.ra:9.4f} {im.dec:9.4f}")
    print(f"{len(images)} image(s)")
    return 0


def _cmd_provenance(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from models.image import Image, ImageType
    from models.provenance import Provenance, ProvenanceTag
    from pipeline.data_store import DataStore

    context = _setup(args)
    with context.session() as session:
        if args.action == "list":
            provs = session.scalars(select(Provenance).order_by(Provenance.process)).all()
            tags: dict[str, list[str]] = {}
            for tag in ProvenanceTag.tags(session=session):
                for prov in ProvenanceTag.provenances(tag, session=session):
                    tags.setdefault(prov.id, []).append(tag)
            for prov in provs:
                print(f"{prov.id}  {prov.process:14} v{prov.code_version:8} tags: "
                      f"{','.join(tags.get(prov.id, [])) or '-'}  {prov.parameters}")
            return 0
        # tag: the provenances the configuration gives for every image's tree
        # (coadds and differences have trees of their own: make-ref and run tag those)
        roots = {im.provenance_id: im for im in session.scalars(
            select(Image).where(Image.type == ImageType.SCIENCE)).all()}
    trees: dict[str, Provenance] = {}
    for image in roots.values():
        tree = DataStore(image, context=context).make_prov_tree(context.config)
        trees.update({p.id: p for p in tree.values()})
    with context.session() as session:
        ProvenanceTag.add(args.tag, trees.values(), session=session)
    print(f"tagged {len(trees)} provenance(s) as '{args.tag}'")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.runner import run_all

    context = _setup(args)
    run_all(context, ids=args.ids, tag=args.tag, verify=args.verify)
    return 0


def _cmd_make_ref(args: argparse.Namespace) -> int:
    from pipeline.make_ref import make_reference

    context = _setup(args)
    made = make_reference(context, ra=args.ra, dec=args.dec, filter=args.filter, start_mjd=args.start_mjd,
                          end_mjd=args.end_mjd, max_seeing=args.max_seeing, image_ids=args.images, tag=args.tag,
                          valid_from_mjd=args.valid_from, valid_until_mjd=args.valid_until)
    print(f"components: {len(made.components)} image(s)")
    for image in made.components:
        print(f"  image {image.id} {image.instrument} {image.section_id} {image.filter} mjd {image.mjd:.5f}")
    print(made.describe())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    run_demo(config_path=args.config, n_images=args.n_images, size=args.size, verbose=args.verbose)
    return 0


def _common(*, suppress: bool) -> argparse.ArgumentParser:
    """``--config`` and ``-v``.  The subcommands' copies leave the values alone when not given
    (argparse.SUPPRESS), so ``seechange --config F run`` keeps F."""
    common = argparse.ArgumentParser(add_help=False)
    default = {"default": argparse.SUPPRESS} if suppress else {}
    common.add_argument("--config", metavar="FILE", help="user config file (else $SEECHANGE_CONFIG)",
                        **({"default": None} | default))
    common.add_argument("-v", "--verbose", action="store_true", help="log progress and show tracebacks",
                        **({"default": False} | default))
    return common


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``seechange`` command."""
    from models.maintenance import DEFAULT_MIN_AGE

    common = _common(suppress=True)
    parser = argparse.ArgumentParser(prog="seechange", parents=[_common(suppress=False)],
                                     description="SeeChange: find what changed on the sky.")
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", parents=[common], help="database schema, checks and repairs")
    db.add_argument("action", choices=["upgrade", "check", "clean"],
                    help="upgrade: apply all migrations; check: compare rows and files (exit 1 if "
                         "anything is wrong); clean: repair what check finds")
    db.add_argument("--dry-run", action="store_true", help="clean: only say what would be done")
    db.add_argument("--quick", action="store_true", help="check, clean: do not compare md5s")
    db.add_argument("--min-age", type=float, default=DEFAULT_MIN_AGE, metavar="SECONDS",
                    help="check, clean: leave out files younger than this, which may belong to a "
                         f"save in progress (default {DEFAULT_MIN_AGE:g}; 0 when nothing is running)")
    db.set_defaults(func=_cmd_db)

    ingest = sub.add_parser("ingest", parents=[common], help="ingest FITS files")
    ingest.add_argument("files", nargs="+", metavar="FILE")
    ingest.add_argument("--instrument", metavar="NAME", help="instrument (default: from the header)")
    ingest.add_argument("--weight", metavar="FILE", help="inverse-variance weight of the (one) image")
    ingest.add_argument("--flags", metavar="FILE", help="mask of the (one) image (non-zero = bad)")
    ingest.set_defaults(func=_cmd_ingest)

    images = sub.add_parser("images", parents=[common], help="list or find images")
    images.add_argument("--ra", type=float, help="RA (deg) that the image must contain")
    images.add_argument("--dec", type=float, help="Dec (deg) that the image must contain")
    images.add_argument("--filter")
    images.add_argument("--instrument")
    images.add_argument("--type", choices=["science", "coadd", "difference"],
                        help="only images of this kind (default: all)")
    images.add_argument("--tag", help="only images whose provenance is in this tag")
    images.add_argument("--order-by", default="earliest", choices=["earliest", "latest", "quality"],
                        help="'quality' (deepest, then sharpest) needs --tag")
    images.add_argument("--max-number", type=int)
    images.set_defaults(func=_cmd_images)

    run = sub.add_parser("run", parents=[common], help="run the pipeline on images or exposures")
    run.add_argument("ids", nargs="*", help="image or exposure ids (default: every exposure and image)")
    run.add_argument("--tag", help="tag the provenances used with this name")
    run.add_argument("--verify", action="store_true",
                     help="md5-check the files of the products that would be skipped; make damaged ones again")
    run.set_defaults(func=_cmd_run)

    make_ref = sub.add_parser("make-ref", parents=[common],
                              help="coadd images of a field, calibrate the coadd and register it as a reference")
    make_ref.add_argument("--ra", type=float, help="RA (deg) the component images must contain")
    make_ref.add_argument("--dec", type=float, help="Dec (deg) the component images must contain")
    make_ref.add_argument("--filter", help="filter of the component images")
    make_ref.add_argument("--start-mjd", type=float, help="earliest component image (MJD)")
    make_ref.add_argument("--end-mjd", type=float, help="latest component image (MJD)")
    make_ref.add_argument("--max-seeing", type=float, help="worst seeing of a component, arcsec (needs --tag)")
    make_ref.add_argument("--tag", help="tag whose PSFs give the components' seeing")
    make_ref.add_argument("--images", nargs="+", metavar="ID", help="the component image ids (instead of a search)")
    make_ref.add_argument("--valid-from", type=float, metavar="MJD", help="first MJD the reference applies to")
    make_ref.add_argument("--valid-until", type=float, metavar="MJD", help="last MJD the reference applies to")
    make_ref.set_defaults(func=_cmd_make_ref)

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


class Terminated(BaseException):
    """SIGTERM arrived: unwind like Ctrl-C, so that the save in progress cleans up."""


def _terminate(signum, _frame) -> None:
    raise Terminated(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``seechange`` command."""
    from pipeline.runner import error_line
    from util.memory import keep_freed_memory

    keep_freed_memory()   # a pipeline process: reuse freed full-frame blocks (util/memory.py)
    parser = build_parser()
    args = parser.parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return args.func(args)
    except (Terminated, KeyboardInterrupt) as exc:
        name = str(exc) or "SIGINT"
        print(f"seechange {args.command}: interrupted by {name}; nothing half-saved, run it again "
              "to go on", file=sys.stderr)
        return 128 + (signal.SIGTERM if name == "SIGTERM" else signal.SIGINT)
    except Exception as exc:  # one clear line for the user; --verbose shows the traceback
        if getattr(args, "verbose", False):
            raise
        print(f"seechange {args.command}: error: {error_line(exc)}", file=sys.stderr)
        return 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
