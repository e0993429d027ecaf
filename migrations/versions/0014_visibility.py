"""visibility: run failures, longer run statuses, entries not made (journey paused)

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-02 06:30:00
"""

from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # `completed_with_failures` does not fit in 16 characters.
    op.alter_column('journey_runs', 'status',
               existing_type=sqlmodel.sql.sqltypes.AutoString(length=16),
               type_=sqlmodel.sql.sqltypes.AutoString(length=32),
               existing_nullable=False)
    op.add_column('journey_runs', sa.Column('failures', sa.Integer(), server_default=sa.text('0'), nullable=False))
    op.add_column('launches', sa.Column('error', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
    op.create_table('entry_skips',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('journey_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('journey_version', sa.Integer(), nullable=False),
    sa.Column('customer_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('message_id', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
    sa.Column('event', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=True),
    sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('journey_id', 'message_id', name='ux_entry_skips_event')
    )
    op.create_index('ix_entry_skips_customer', 'entry_skips', ['customer_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_entry_skips_customer', table_name='entry_skips')
    op.drop_table('entry_skips')
    op.drop_column('launches', 'error')
    op.drop_column('journey_runs', 'failures')
    op.alter_column('journey_runs', 'status',
               existing_type=sqlmodel.sql.sqltypes.AutoString(length=32),
               type_=sqlmodel.sql.sqltypes.AutoString(length=16),
               existing_nullable=False)
