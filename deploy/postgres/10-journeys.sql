-- Runs once, on the first start of an empty data volume (docker-entrypoint-initdb.d).
-- The superuser (POSTGRES_USER=temporal) owns Temporal's databases, which the
-- temporal-schema job creates; the application gets its own role and database.
CREATE ROLE journeys WITH LOGIN PASSWORD 'journeys';
CREATE DATABASE journeys OWNER journeys;
