"""Small runnable example programs."""
