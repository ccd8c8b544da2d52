"""The HTTP API as one process: the app that mounts the domains' routers, the body cap, health,
metrics and the dashboard."""
