"""What a job does, without Celery: load and check its inputs, prune to a goal, measure,
fine-tune, export and verify, log to MLflow; `local` runs the same steps in-process
(`apoptosis prune`)."""
