"""Small widgets and text renderers of the dashboard, one concept per module."""
