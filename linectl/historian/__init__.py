"""The plant historian: every line's records in one PostgreSQL database (issue 13).

- linectl.historian.pg: the schema's migrations and the ingest side (HistorianDB, async,
  psycopg 3), what the historian service writes through;
- linectl.historian.reader: the read side (HistorianReader, synchronous), what
  `linectl report --historian DSN` reads: the plant reel list and any reel's report,
  identical to the line's own;
- linectl.historian.service, .tracker, .config, .cli: the service that takes the lines'
  records from the broker and keeps the historian complete.

The database modules need the optional extra `historian` (psycopg); nothing here imports
them, so `linectl` without the extra still starts.
"""
