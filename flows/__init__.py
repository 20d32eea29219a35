"""Prefect flows: they wire tasks and branch on gate results, nothing else."""
