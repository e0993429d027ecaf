"""audience launches

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 13:27:04.039339
"""

from alembic import op
import sqlalchemy as sa
import sqlmodel
from sqlalchemy.dialects import postgresql

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table('launches',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('journey_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('audience', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('rate_per_second', sa.Float(), nullable=False),
    sa.Column('page_size', sa.Integer(), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('enrolled', sa.Integer(), server_default='0', nullable=False),
    sa.Column('skipped', sa.Integer(), server_default='0', nullable=False),
    sa.Column('cursor', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('schedule_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_launches_journey_id'), 'launches', ['journey_id'], unique=False)



def downgrade() -> None:

    op.drop_index(op.f('ix_launches_journey_id'), table_name='launches')
    op.drop_table('launches')

