"""Dataset readers, webdataset shard conversion, shard checks and streaming."""
