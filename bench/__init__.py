"""Benchmarks, each a module run from the repository root as `python -m bench.<name>`.

They import each other as `bench.<name>` and the service harness the integration tests use from
`tests.integration.services`, in the one place both share.
"""
