"""Developer tool: regenerate ``versions/0001_initial.py`` from the models.

Until the first release the schema lives in one migration that is regenerated whenever a table
changes (``python alembic/make_initial_migration.py`` from the repository root).  After a release,
new migrations are added with ``alembic revision --autogenerate`` instead.
"""

import sys
import tempfile
from pathlib import Path

from alembic import command

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.base import make_engine  # noqa: E402
from models.schema import _alembic_config, alembic_dir  # noqa: E402

target = alembic_dir() / "versions" / "0001_initial.py"
target.unlink(missing_ok=True)
# Later migrations (e.g. 0002, the PostgreSQL q3c index) build on 0001: set them aside meanwhile.
later = sorted((alembic_dir() / "versions").glob("0*.py"))
for path in later:
    path.rename(path.with_suffix(".aside"))
try:
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite:///{tmp}/empty.sqlite")
        cfg = _alembic_config(engine)
        with engine.begin() as connection:
            cfg.attributes["connection"] = connection
            command.revision(cfg, message="initial schema", autogenerate=True, rev_id="0001",
                             head="base")
finally:
    for path in later:
        path.with_suffix(".aside").rename(path)
produced = next((alembic_dir() / "versions").glob("0001_*.py"))
if produced != target:
    produced.rename(target)
print(f"wrote {target}")
