"""API request and response schemas (pydantic), separate from the ORM tables: `XCreate`,
`XUpdate` (PUT), `XPatch` (PATCH) and `XPublic` per resource. Input schemas forbid unknown
fields; deep structure (actors, selectors, port specs) is validated by the policy-file loader
so the API and the file share one set of rules."""
