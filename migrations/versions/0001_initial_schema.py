"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-28 12:35:03.715549
"""

from alembic import op
import sqlalchemy as sa
import sqlmodel
from sqlalchemy.dialects import postgresql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table('customers',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('traits', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('timezone', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('merged_into', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_customers_merged_into'), 'customers', ['merged_into'], unique=False)
    op.create_table('events',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('message_id', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
    sa.Column('type', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('event', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=True),
    sa.Column('user_id', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=True),
    sa.Column('anonymous_id', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=True),
    sa.Column('previous_id', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=True),
    sa.Column('customer_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('timestamp', sa.DateTime(timezone=True), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('routed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('payload', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('message_id')
    )
    op.create_index('ix_events_customer_event', 'events', ['customer_id', 'event'], unique=False)
    op.create_index('ix_events_customer_time', 'events', ['customer_id', 'timestamp'], unique=False)
    op.create_index('ix_events_unrouted', 'events', ['timestamp', 'id'], unique=False, postgresql_where=sa.text('routed_at IS NULL'))
    op.create_table('journey_runs',
    sa.Column('enrollment_id', sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=False),
    sa.Column('run_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('workflow_id', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
    sa.Column('journey_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('journey_version', sa.Integer(), nullable=False),
    sa.Column('customer_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('exit_reason', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('ended_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('enrollment_id')
    )
    op.create_index(op.f('ix_journey_runs_workflow_id'), 'journey_runs', ['workflow_id'], unique=False)
    op.create_index('ix_runs_customer_status', 'journey_runs', ['customer_id', 'status'], unique=False)
    op.create_index('ix_runs_journey_customer', 'journey_runs', ['journey_id', 'customer_id'], unique=False)
    op.create_table('journeys',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('current_version', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('messages',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('idempotency_key', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
    sa.Column('customer_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('journey_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('journey_version', sa.Integer(), nullable=True),
    sa.Column('step_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('workflow_id', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=True),
    sa.Column('channel', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('subject', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('body', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('idempotency_key')
    )
    op.create_index(op.f('ix_messages_customer_id'), 'messages', ['customer_id'], unique=False)
    op.create_index(op.f('ix_messages_journey_id'), 'messages', ['journey_id'], unique=False)
    op.create_table('identities',
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('value', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
    sa.Column('customer_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['customer_id'], ['customers.id'], ),
    sa.PrimaryKeyConstraint('kind', 'value')
    )
    op.create_index(op.f('ix_identities_customer_id'), 'identities', ['customer_id'], unique=False)
    op.create_table('journey_versions',
    sa.Column('journey_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('definition', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('checksum', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['journey_id'], ['journeys.id'], ),
    sa.PrimaryKeyConstraint('journey_id', 'version')
    )



def downgrade() -> None:

    op.drop_table('journey_versions')
    op.drop_index(op.f('ix_identities_customer_id'), table_name='identities')
    op.drop_table('identities')
    op.drop_index(op.f('ix_messages_journey_id'), table_name='messages')
    op.drop_index(op.f('ix_messages_customer_id'), table_name='messages')
    op.drop_table('messages')
    op.drop_table('journeys')
    op.drop_index('ix_runs_journey_customer', table_name='journey_runs')
    op.drop_index('ix_runs_customer_status', table_name='journey_runs')
    op.drop_index(op.f('ix_journey_runs_workflow_id'), table_name='journey_runs')
    op.drop_table('journey_runs')
    op.drop_index('ix_events_unrouted', table_name='events', postgresql_where=sa.text('routed_at IS NULL'))
    op.drop_index('ix_events_customer_time', table_name='events')
    op.drop_index('ix_events_customer_event', table_name='events')
    op.drop_table('events')
    op.drop_index(op.f('ix_customers_merged_into'), table_name='customers')
    op.drop_table('customers')

