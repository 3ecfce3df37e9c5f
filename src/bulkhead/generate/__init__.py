"""Policy generation from observed traffic (docs/design/generator.md)."""

from bulkhead.generate.encode import FlowColumns
from bulkhead.generate.generator import (
    GRANULARITIES,
    Candidate,
    Options,
    Result,
    generate,
    label_selector,
)

__all__ = ["GRANULARITIES", "Candidate", "FlowColumns", "Options", "Result", "generate",
           "label_selector"]
