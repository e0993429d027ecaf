"""PostgreSQL access shared by the API, the activities and the outbox router (asyncpg, SQL)."""
