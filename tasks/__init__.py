"""Domain steps as plain typed functions, with thin Prefect task wrappers."""
