"""Label Studio's formats, with no Flask, SQL session or torch: what the web process, the worker and the statistics
all read the same way.

- ``annotations``: a Label Studio annotation (webhook, API export, export file) → a stored label (``LabelIn``);
  who made it and when.
- ``files``: label files (Label Studio JSON export, CSV, JSONL) → rows.
- ``url``: Label Studio's base URL, checked.
"""
