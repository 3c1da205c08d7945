"""ihmp."""
