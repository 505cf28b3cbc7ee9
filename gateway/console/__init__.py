"""The compliance console (``console.*``): a web application for compliance officers."""
