"""Versioned Arrow schemas of the segment job's outputs, as JSON (read them with ``dcfm.schemas``)."""
