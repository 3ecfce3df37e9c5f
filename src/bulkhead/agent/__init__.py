"""The host agent: sensors, a pure core, and one runtime that does the I/O."""
