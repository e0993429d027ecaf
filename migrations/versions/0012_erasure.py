"""erasures: durable records of customer erasures (only hashes once done)

Revision ID: 0012
Revises: 0011 (the coordinator re-points this after 0010 / 0011 at merge)
Create Date: 2026-12-02 05:40:00
"""

from alembic import op
import sqlalchemy as sa
import sqlmodel
from sqlalchemy.dialects import postgresql


revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('erasures',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('mode', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('customer_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('customer_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('customer_ids', postgresql.ARRAY(sa.String()), nullable=True),
    sa.Column('workflow_ids', postgresql.ARRAY(sa.String()), nullable=True),
    sa.Column('ref_hashes', postgresql.ARRAY(sa.String()), server_default=sa.text("'{}'::varchar[]"), nullable=False),
    sa.Column('requested_by', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
    sa.Column('source', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('counts', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('requested_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ux_erasures_running_customer', 'erasures', ['customer_id'], unique=True, postgresql_where=sa.text("status = 'running'"))
    op.create_index('ix_erasures_ref_hashes', 'erasures', ['ref_hashes'], unique=False, postgresql_using='gin')


def downgrade() -> None:
    op.drop_index('ix_erasures_ref_hashes', table_name='erasures', postgresql_using='gin')
    op.drop_index('ux_erasures_running_customer', table_name='erasures', postgresql_where=sa.text("status = 'running'"))
    op.drop_table('erasures')
