"""contact policy

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28 13:50:20.219828
"""

from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table('subscriptions',
    sa.Column('customer_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('channel', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('topic', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('source', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('customer_id', 'channel', 'topic')
    )
    op.create_table('suppressions',
    sa.Column('channel', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('address', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
    sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('channel', 'address')
    )
    op.add_column('messages', sa.Column('category', sqlmodel.sql.sqltypes.AutoString(length=16), server_default='marketing', nullable=False))
    op.add_column('messages', sa.Column('skip_reason', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True))
    op.add_column('messages', sa.Column('address', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=True))
    op.create_index('ix_messages_customer_created', 'messages', ['customer_id', 'created_at'], unique=False)



def downgrade() -> None:

    op.drop_index('ix_messages_customer_created', table_name='messages')
    op.drop_column('messages', 'address')
    op.drop_column('messages', 'skip_reason')
    op.drop_column('messages', 'category')
    op.drop_table('suppressions')
    op.drop_table('subscriptions')

