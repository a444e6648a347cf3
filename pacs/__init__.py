"""PACS connection: DICOMweb client, change feeds, result objects written back, and the worker loop."""
