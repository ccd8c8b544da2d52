"""Requests to what a tenant names (webhook receivers, MLflow tracking servers): the SSRF guard
that decides where we may connect (`guard`) and the one client that connects there (`client`)."""
