"""run keys and entry events

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 12:52:36.313404
"""

from alembic import op
import sqlalchemy as sa
import sqlmodel
from sqlalchemy.dialects import postgresql

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.add_column('journey_runs', sa.Column('run_key', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
    op.add_column('journey_runs', sa.Column('entry', postgresql.JSONB(astext_type=sa.Text()), nullable=True))



def downgrade() -> None:

    op.drop_column('journey_runs', 'entry')
    op.drop_column('journey_runs', 'run_key')

