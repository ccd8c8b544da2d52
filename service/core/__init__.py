"""What every room of the service stands on: settings, the database and its tables, the error
base and its problem+json answer, keyset cursors, the artifact store, the queue client, archives
and timestamps. Imports no domain (the ORM aside: its columns default to the domains' states)."""
