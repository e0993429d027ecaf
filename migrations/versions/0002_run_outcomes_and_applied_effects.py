"""run outcomes and applied effects

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 12:41:29.034536
"""

from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table('applied_effects',
    sa.Column('idempotency_key', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('idempotency_key')
    )
    op.add_column('journey_runs', sa.Column('goal_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('journey_runs', sa.Column('arm', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
    op.add_column('journey_runs', sa.Column('holdout', sa.Boolean(), server_default=sa.text('false'), nullable=False))



def downgrade() -> None:

    op.drop_column('journey_runs', 'holdout')
    op.drop_column('journey_runs', 'arm')
    op.drop_column('journey_runs', 'goal_at')
    op.drop_table('applied_effects')

