"""The dashboard: one small bundled page (no build step) that speaks the public API with the
user's API key, like any other client."""
