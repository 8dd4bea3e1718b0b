-- One-time set-up on an existing PostgreSQL server (not needed with docker-compose.yml):
--   psql -h HOST -U postgres -f storage/setup.sql
-- then point every machine at: postgresql://alpa:PASSWORD@HOST:5432/alpa
-- alpa-tune creates the Optuna tables itself, once, under an advisory lock.
CREATE ROLE alpa LOGIN PASSWORD 'change-me';
CREATE DATABASE alpa OWNER alpa;
