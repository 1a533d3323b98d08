"""q3c spatial index on images (PostgreSQL with the q3c extension only)

On PostgreSQL, when the q3c extension is available on the server, create it and a functional
index ``q3c_ang2ipix(ra, dec)`` on ``images`` so that ``q3c_radial_query`` cone searches are
indexed (`models.image_queries`).  On SQLite, or when q3c is not installed, do nothing: queries
then use the bounding-box indexes of 0001.

Revision ID: 0002
Revises: 0001
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

INDEX_NAME = "ix_images_q3c_ang2ipix"


def _q3c_available(bind) -> bool:
    available = sa.table("pg_available_extensions", sa.column("name"))
    found = bind.execute(sa.select(available.c.name).where(available.c.name == "q3c")).first()
    return found is not None


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql" or not _q3c_available(bind):
        return
    op.execute(sa.text("CREATE EXTENSION IF NOT EXISTS q3c"))
    op.create_index(INDEX_NAME, "images",
                    [sa.func.q3c_ang2ipix(sa.column("ra"), sa.column("dec"))])


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    op.drop_index(INDEX_NAME, table_name="images", if_exists=True)
