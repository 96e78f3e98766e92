"""Data: raw sources, DuckDB preprocessing, validation, and loading the processed splits."""
