"""Video data for HPDM: shard writing, object storage, streaming, decoding, and the synthetic dataset."""
