"""journey drafts

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 13:07:28.966401
"""

from alembic import op
import sqlalchemy as sa
import sqlmodel
from sqlalchemy.dialects import postgresql

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.add_column('journeys', sa.Column('draft', postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    op.add_column('journeys', sa.Column('draft_updated_at', sa.DateTime(timezone=True), nullable=True))



def downgrade() -> None:

    op.drop_column('journeys', 'draft_updated_at')
    op.drop_column('journeys', 'draft')

