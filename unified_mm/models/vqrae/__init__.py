"""models/vqrae."""
