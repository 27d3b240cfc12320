"""Helpers for orchestrators (Airflow): reading the pipeline graph from dvc.yaml. No ML here."""
