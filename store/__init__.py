"""The worklist's results store: SQLAlchemy models, Alembic migrations and the job queue with leases."""

from store.database import Store, default_database_url, open_store
from store.models import STATUSES

__all__ = ["STATUSES", "Store", "default_database_url", "open_store"]
