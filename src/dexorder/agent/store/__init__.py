"""The agent's SQLite state: one database file in the data directory."""
