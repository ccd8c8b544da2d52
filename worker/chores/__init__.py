"""The chores each worker runs in threads beside its job: retention (expire artifacts, sweep
blobs) and webhook delivery. They touch no pipeline and no engine."""
