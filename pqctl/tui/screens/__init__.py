"""Modal screens of the dashboard: help, and the plan file dialog."""
