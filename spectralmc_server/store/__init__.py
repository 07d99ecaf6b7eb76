"""Model versions on an object store: content-addressed, hash-chained, moved by CAS."""
