"""Bulk catalogue jobs, split by stage: ``ingest`` plans (new, changed, unchanged, gone; time and
cost) and runs (checkpoints, retries, dead letters, incremental sync); ``dataset`` reads, hashes
and preprocesses items in DataLoader workers; ``encode`` is the encode step both engines share;
``ray_engine`` spreads reading and encoding over a Ray cluster; ``state`` keeps the job records."""
