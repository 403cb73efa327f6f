"""models/harmon."""
