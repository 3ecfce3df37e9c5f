"""Use-case functions: keyword-only, own no transaction, raise domain errors."""
