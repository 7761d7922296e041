"""Alembic revisions, one file per schema change (named ``<rev-id>_<slug>.py``)."""
