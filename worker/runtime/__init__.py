"""The Celery runtime of a worker process: the app and its thin tasks, the job lifecycle (claim,
lease, heartbeat, finish, reap, validation), the torch thread pool and the frozen heap."""
