"""list indexes: keyset pages of a journey's runs and of customers, newest first

GET /v1/journeys/{id}/runs and GET /v1/customers page by (started_at, enrollment_id) and
(created_at, id), newest first (store/listing.py). Without these indexes each page sorts every
run of the journey (every customer): ~40 ms a page at 300,000 rows, growing with the table.
Built CONCURRENTLY: writes (routing, enrolment) go on while they build.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02 06:05:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index('ix_runs_journey_started', 'journey_runs', ['journey_id', 'started_at', 'enrollment_id'], unique=False, postgresql_concurrently=True, if_not_exists=True)
        op.create_index('ix_customers_created', 'customers', ['created_at', 'id'], unique=False, postgresql_where=sa.text('merged_into IS NULL'), postgresql_concurrently=True, if_not_exists=True)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index('ix_customers_created', table_name='customers', postgresql_concurrently=True, if_exists=True)
        op.drop_index('ix_runs_journey_started', table_name='journey_runs', postgresql_concurrently=True, if_exists=True)
