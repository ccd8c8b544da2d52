"""`apoptosis`: the server and worker commands, keys, a local prune, and the API's client
commands."""
