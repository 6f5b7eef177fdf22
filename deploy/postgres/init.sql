-- Runs once when the PostgreSQL volume is new. Optuna creates its own tables on first use;
-- this only makes sure the store does not fill up with idle connections from crashed workers.
ALTER DATABASE tuner SET idle_in_transaction_session_timeout = '10min';
