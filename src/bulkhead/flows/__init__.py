"""Flow records: schema, parsers and stores."""
