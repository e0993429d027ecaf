"""dead letters of the router; events remember when they were applied to the profile

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 05:20:00
"""

from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('events', sa.Column('applied_at', sa.DateTime(timezone=True), nullable=True))
    # Events routed before this migration were applied: routed again, they must not re-apply.
    op.execute("UPDATE events SET applied_at = routed_at WHERE routed_at IS NOT NULL")
    op.create_table('dead_letters',
    sa.Column('event_id', sa.BigInteger(), nullable=False),
    sa.Column('message_id', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
    sa.Column('error', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('error_type', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('failures', sa.Integer(), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('replayed_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['event_id'], ['events.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('event_id')
    )
    op.create_index('ix_dead_letters_status', 'dead_letters', ['status', 'id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_dead_letters_status', table_name='dead_letters')
    op.drop_table('dead_letters')
    op.drop_column('events', 'applied_at')
