"""slm-annotator: a Label Studio ML backend whose small model learns to label like your annotators."""

__version__ = "0.1.0"
