"""Dataset readers, webdataset shard conversion and streaming (issue 3)."""
