"""ORM tables, one module per area; all share `bulkhead.server.db.Base`. Importing this
package registers every table (every module here is imported)."""

from __future__ import annotations

import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
