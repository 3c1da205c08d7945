"""dime."""
