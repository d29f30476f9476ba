"""Tasks (text-to-text examples), their encoding into fixed-shape batches, and metrics."""
