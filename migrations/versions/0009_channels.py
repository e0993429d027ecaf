"""channels: send claims, provider ids, feedback timestamps, stored templates

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28 15:30:00
"""

from alembic import op
import sqlalchemy as sa
import sqlmodel
from sqlalchemy.dialects import postgresql


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

_TS = ("claimed_at", "delivered_at", "opened_at", "clicked_at", "read_at")


def upgrade() -> None:
    op.add_column('messages', sa.Column('html', sa.String(), nullable=True))
    op.add_column('messages', sa.Column('provider_id', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=True))
    op.add_column('messages', sa.Column('attempts', sa.Integer(), server_default='0', nullable=False))
    op.add_column('messages', sa.Column('error', sa.String(), nullable=True))
    op.add_column('messages', sa.Column('template_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
    op.add_column('messages', sa.Column('template_version', sa.Integer(), nullable=True))
    op.add_column('messages', sa.Column('test', sa.Boolean(), server_default=sa.false(), nullable=False))
    op.add_column('messages', sa.Column('links', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"), nullable=False))
    for name in _TS:
        op.add_column('messages', sa.Column(name, sa.DateTime(timezone=True), nullable=True))
    op.create_index('ix_messages_provider_id', 'messages', ['channel', 'provider_id'], unique=False)
    op.create_index('ix_customers_phone', 'customers', [sa.text("regexp_replace(traits->>'phone', '[^0-9+]', '', 'g')")], unique=False, postgresql_where=sa.text('merged_into IS NULL'))
    op.create_table('send_rate_windows',
    sa.Column('channel', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('window_start', sa.DateTime(timezone=True), nullable=False),
    sa.Column('sent', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('channel', 'window_start')
    )
    op.create_table('templates',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('channel', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('current_version', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('template_versions',
    sa.Column('template_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('subject', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('body', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('html', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['template_id'], ['templates.id'], ),
    sa.PrimaryKeyConstraint('template_id', 'version')
    )


def downgrade() -> None:
    op.drop_table('send_rate_windows')
    op.drop_table('template_versions')
    op.drop_table('templates')
    op.drop_index('ix_messages_provider_id', table_name='messages')
    op.drop_index('ix_customers_phone', table_name='customers')
    for name in _TS:
        op.drop_column('messages', name)
    for name in ('links', 'test', 'template_version', 'template_id', 'error', 'attempts', 'provider_id', 'html'):
        op.drop_column('messages', name)
