"""HTTP routers (`/api/v1`), one module per area."""
