"""Entry points submitted with `ray job submit`, and their input handling."""
