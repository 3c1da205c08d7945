"""stacktrans."""
