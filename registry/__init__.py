"""MLflow tracking, registry, aliases and promotion."""
