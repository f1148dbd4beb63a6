"""Prefect flows and the `fiqa` CLI.

Importing this package changes nothing in the environment: a served or deployed run logs with the
worker's own Prefect settings. The `fiqa` entry point (flows.cli.main) sets its offline-friendly
defaults before it imports Prefect (flows.command.prefect_defaults).
"""
