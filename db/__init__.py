"""Database models, engine and session, and the queries the workers need."""
