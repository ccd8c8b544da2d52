"""Apoptosis service: HTTP API, database, queue client, CLI and SDK. Never imports torch."""
