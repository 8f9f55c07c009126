"""The store: the one place that speaks to PostgreSQL.

``database`` holds the pool, transactions, retries and the translation of driver
errors; the ``*_store`` modules hold one typed function per named query of
``sql/queries.sql`` (keyword arguments in, records out); ``listener`` is the LISTEN
session; ``migrations`` applies ``schema/``; ``cluster`` runs a throwaway server.
Nothing outside this package imports the driver.
"""

from .database import Connection, Database, check_schema_name, is_transient, mapped_errors

__all__ = ["Connection", "Database", "check_schema_name", "is_transient", "mapped_errors"]
