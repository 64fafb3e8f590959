"""Zero-shot classification, retrieval, linear probes and search."""
