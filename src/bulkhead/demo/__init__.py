"""`bulkhead demo`: visibility to a contained attack, live in a lab or on recorded flows."""
