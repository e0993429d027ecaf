"""one live run per workflow id

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28 13:14:16.106243
"""

from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_index('ux_runs_live_workflow', 'journey_runs', ['workflow_id'], unique=True, postgresql_where=sa.text("status IN ('starting', 'running')"))



def downgrade() -> None:

    op.drop_index('ux_runs_live_workflow', table_name='journey_runs', postgresql_where=sa.text("status IN ('starting', 'running')"))

