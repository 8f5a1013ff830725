"""The dashboard's five views (tabs): Cluster, Plan, Serve, Prompt and Logs."""
